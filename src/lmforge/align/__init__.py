"""Alignment: supervised fine-tuning (SFT) on conversations, LoRA adapters, instruction data.

``sft`` / ``SFTConfig`` (``align.sft``) run the stage; ``read_conversations``, ``load_sources``,
``split_validation`` (``align.data``) read conversations; ``GENERATORS`` / ``DEFAULT_MIXTURE``
(``align.generators``) make offline, verifiable instruction data; ``encode``, ``SFTBatches``,
``sft_loss`` (``align.packing``) turn them into rows and a loss; ``LoRAConfig``, ``apply_lora``,
``merge_and_unload``, ``save_peft``, ``load_peft`` (``align.lora``) adapt a model. Names are imported
on first use, so importing the package (as the command line does for ``_cli``) loads nothing heavy.
"""

_WHERE = {
    "SFTConfig": "sft", "SFTStage": "sft", "sft": "sft", "check_config": "sft",
    "read_conversations": "data", "check_messages": "data", "load_sources": "data", "split_validation": "data",
    "GENERATORS": "generators", "DEFAULT_MIXTURE": "generators", "check_disjoint": "generators",
    "Example": "packing", "encode": "packing", "pack_bfd": "packing", "SFTBatches": "packing",
    "sft_loss": "packing", "add_neftune": "packing",
    "LoRAConfig": "lora", "apply_lora": "lora", "lora_parameters": "lora", "merge": "lora", "unmerge": "lora",
    "merge_and_unload": "lora", "save_peft": "lora", "load_peft": "lora",
    **dict.fromkeys(("read_preferences", "unpair_preferences", "split_validation_pairs", "PrefExample", "encode_preferences", "PrefBatches", "completion_logps"), "pref_data"),
    "DPOConfig": "dpo", "DPOStage": "dpo", "dpo": "dpo", "adapters_disabled": "lora",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
