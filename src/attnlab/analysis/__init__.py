"""Analysis: the one function that scores a model on tokens (and the unigram baseline), sampling,
attention capture, attention statistics (and across training), interventions and position probes. Stages:
evaluate, attention_stats, attention_dynamics, interventions, position_analysis. A new intervention goes in
interventions.py.
"""
