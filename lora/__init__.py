"""Hand-written LoRA for markerlab: inject, train, merge, save/load in PEFT's format.

    import torch
    from lora import inject_lora, trainable_parameters, save_adapter, load_adapter, save_merged

    n = inject_lora(model, r=16, alpha=32, dropout=0.05,
                    generator=torch.Generator().manual_seed(42))   # freezes the base, returns #trainable
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    ...
    save_adapter(model, run_dir / "adapter", base_model_name_or_path)   # PeftModel.from_pretrained reads it
    save_merged(model, tokenizer, run_dir / "merged")                  # leaves `model` merged

See lora/lora.py for the maths and lora/io.py for the file formats.
"""

from .io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    peft_key,
    read_adapter_config,
    save_adapter,
    save_merged,
)
from .lora import (
    DEFAULT_TARGET_MODULES,
    LoRALinear,
    count_trainable,
    inject_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_all,
    trainable_parameters,
    unmerge_all,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterError",
    "DEFAULT_TARGET_MODULES",
    "LoRALinear",
    "count_trainable",
    "inject_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_modules",
    "lora_state_dict",
    "merge_all",
    "peft_key",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
    "trainable_parameters",
    "unmerge_all",
]
