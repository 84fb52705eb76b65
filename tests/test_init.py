"""The public surface and the no-import-time-effects rule."""

from __future__ import annotations

import subprocess
import sys


def test_public_api():
    import kt_trl

    assert kt_trl.__version__ == "0.1.0"
    assert set(kt_trl.__all__) == {"KTSFTTrainer", "KTConfig", "save_per_expert_adapter", "load_model", "plan",
                                   "__version__"}
    assert kt_trl.KTSFTTrainer.__name__ == "KTSFTTrainer"
    assert kt_trl.save_per_expert_adapter.__module__ == "kt_trl.per_expert_adapter"
    assert kt_trl.load_model.__module__ == "kt_trl.loading" and kt_trl.plan.__module__ == "kt_trl.preflight"


def test_import_loads_neither_trl_nor_the_native_engine():
    code = (
        "import sys, kt_trl; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'peft', 'cffi') or m.startswith('kt_trl.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
