"""Defenses: input transforms, trained defenses (adversarial training, NLCE), detectors,
ensembles and detect-then-route. ``_detectors``, ``_adversarial_training`` and ``_nlce`` are
the libraries behind them; ``_common`` holds training-split checks and fingerprints."""
