"""SAE-feature subspace finetuning (SAILS, Wang, Ma et al., arXiv 2512.23260).

Finetune a causal LM only inside a subspace of its residual stream spanned by SAE features
that separate a wanted behaviour (target) from an unwanted one (contrast):

1. **Feature selection** (:mod:`.features`: :func:`mean_feature_activations`, :func:`select_features`):
   mean SAE activation of every latent over the response tokens of target and of contrast examples,
   at one or more layers; ``delta = E_target - E_contrast`` and the relative score
   ``delta / max_m E_contrast[|a_m|]`` (scale-free, comparable across layers); the top latents
   per layer by relative score (target-side latents, as SAILS) or by its magnitude (latents of
   either behaviour, so the update can also lower the contrast behaviour's latents).
2. **Subspace construction** (:mod:`.adapters`: :func:`build_subspace`): their decoder directions
   (unit norm) -> PCA keeping a fraction of the variance (default 0.8; uncentred, so the directions'
   common component - often the main one - is kept) -> QR -> an orthonormal basis U [d, r].
3. **Adapters** (:mod:`.adapters`) on the modules that write to the residual stream at those layers
   (``o_proj`` and ``down_proj`` for Llama-style blocks):
   (a) :class:`SubspaceAdapter`: a LoRA whose output factor is the fixed U, so only the
       r x d_in factor trains and every update lies in span(U) by construction;
   (b) :class:`ProjectedGradient`: the full weights train, but every gradient is projected
       onto span(U) on the output side by :func:`ssae_kernels.project_subspace` (a gradient
       hook), and every optimizer update as well (Adam's per-coordinate scaling would leave
       the span), in place by :func:`ssae_kernels.project_subspace_`.
4. **Finetuning** (:mod:`.finetuning`) with the LM loss on target responses and on kept ordinary
   answers (self-distilled from the base model, :func:`distill_keep`), every method on the same step
   budget, and **evaluation**: the fraction of held-out completions in the target style (for the
   built-in AdvBench / XSTest pair the refusal judge :func:`ssae_kernels.data.refusal.is_refusal`: safety
   rate and over-refusal) and perplexity on neutral text, against projected gradients, plain LoRA of the
   same rank and full finetuning.

``ssae subspace --out DIR`` runs all of it (:func:`run` on a :class:`SubspaceConfig`; ``--tune`` chooses
hyperparameters on the dev split, :mod:`.tuning`) and saves the tuned adapter in DIR/adapter;
``ssae subspace eval`` (:mod:`.evaluation`) measures a saved adapter's refusal rate on any CSV file of prompts;
:mod:`.recovery` checks that the recipe recovers a planted subspace. ``python/subspace_finetune.py`` is the
default demo on SmolLM2-135M-Instruct.
"""

from .adapters import (RESIDUAL_WRITERS, Adapters, LoRAAdapter, ProjectedGradient, Subspace, SubspaceAdapter,
                       WeightDelta, attach_lora_adapters, attach_subspace_adapters, build_subspace, load_adapter,
                       load_subspaces, out_of_span, residual_writers, save_adapter, save_subspaces,
                       subspaces_from_features)
from .commands import add_subcommands
from .features import (FeatureSelection, load_features, mean_feature_activations, residual_streams, save_features,
                       select_features)
from .evaluation import evaluate_adapter, read_prompts
from .finetuning import (FinetuneConfig, count_parameters, distill_keep, evaluate_behaviour, finetune, generate,
                         lm_loss, perplexity, ppl_rise_upper, sequence_nll, training_examples)
from .pipeline import SubspaceConfig, run
from .prompts import encode_example, encode_prompt, format_prompt, pad_batch, pad_token_id
from .stages import METHODS, train_layer_sae
from .tuning import format_tune_table, pick_setting, tune

__all__ = [
    "RESIDUAL_WRITERS", "Adapters", "LoRAAdapter", "ProjectedGradient", "Subspace", "SubspaceAdapter", "WeightDelta",
    "attach_lora_adapters", "attach_subspace_adapters", "build_subspace", "load_adapter", "load_subspaces",
    "out_of_span", "residual_writers", "save_adapter", "save_subspaces", "subspaces_from_features",
    "evaluate_adapter", "read_prompts",
    "add_subcommands",
    "FeatureSelection", "load_features", "mean_feature_activations", "residual_streams", "save_features",
    "select_features",
    "FinetuneConfig", "count_parameters", "distill_keep", "evaluate_behaviour", "finetune", "generate", "lm_loss",
    "perplexity", "ppl_rise_upper", "sequence_nll", "training_examples",
    "SubspaceConfig", "run",
    "encode_example", "encode_prompt", "format_prompt", "pad_batch", "pad_token_id",
    "METHODS", "train_layer_sae",
    "format_tune_table", "pick_setting", "tune",
]
