from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_protocol_side_of_the_package_imports_no_torch() -> None:
    # A fresh interpreter: in this one, other tests have long imported torch.
    code = (
        "import sys\n"
        "import air_registry, air_registry.air, air_registry.catalog, air_registry.schedulers\n"
        "from air_registry import Catalog, resolve_scheduler\n"
        "Catalog.load().resolve('tiny'); resolve_scheduler('Euler a')\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
