"""Analysis: evaluation, sampling, attention capture, attention statistics (and across training),
interventions and position probes, all scored with attnlab.model.scoring. Stages: evaluate, attention_stats,
attention_dynamics, interventions, position_analysis. A new intervention goes in interventions.py.
"""
