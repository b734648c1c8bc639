"""Foundation shared by every markerlab stage: config, tokenizer, built-in tiny model, file I/O.

Stages (``data``, ``trainer``, ``lora``, ``evaluate``, ``analysis``) import from here;
nothing here imports a stage.
"""
