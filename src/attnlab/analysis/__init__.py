"""Analysis: the one function that scores a model on tokens (and the unigram baseline), sampling,
attention capture, attention statistics, interventions and position probes. Stages: evaluate,
attention_stats, interventions, position_analysis. A new intervention goes in interventions.py.
"""
