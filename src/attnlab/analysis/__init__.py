"""Analysis: evaluation, sampling, attention capture, attention statistics (and across training), head roles
(induction, duplicate-token, previous-token, sink), interventions and position probes, all scored with
attnlab.model.scoring. Stages: evaluate, attention_stats, attention_dynamics, head_roles, interventions,
position_analysis. A new intervention goes in interventions.py.
"""
