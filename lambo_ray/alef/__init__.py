"""ALEF: active-learning fine-tuning of the decoder under drift (SPEC section 3).

``expert_pool`` labels queried instances on Ray actors, ``query`` chooses which to label,
``buffer`` keeps the labels (and a replay set of the old regime), ``finetune`` runs the loop.
"""
