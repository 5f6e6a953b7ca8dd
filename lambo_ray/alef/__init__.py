"""ALEF: active-learning fine-tuning of the decoder under drift.

``finetune.run_alef`` runs the loop; ``query`` chooses which arrivals to label, ``expert_pool`` labels
them on Ray actors (``worker``: exact with a time limit, fallbacks), ``buffer`` keeps the labels (and a
replay set of the old regime), ``training`` and ``gate`` update the decoder, ``store`` makes a run
resumable without buying a label twice.
"""
