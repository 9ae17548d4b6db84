"""Editing adapter folders in fault tests: the file names and a config editor."""

import json

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
DELETE = object()  # as a value of edit_config: remove the key


def edit_config(folder, **changes):
    """Sets (or, with ``DELETE``, removes) keys of ``folder/adapter_config.json``."""
    meta = json.loads((folder / CONFIG).read_text())
    for key, value in changes.items():
        if value is DELETE:
            del meta[key]
        else:
            meta[key] = value
    (folder / CONFIG).write_text(json.dumps(meta))
