"""Recipes built on the training layer: ``specialized`` (Specialized SAEs: select, finetune, tail evaluation)."""
