"""Sharded training on 8 forced CPU devices equals single-device training (dp=8, fsdp=8, dp=2 x fsdp=4),
for LoRA, and for QLoRA on dp=2 x fsdp=4 (4-bit bases sharded in their packed form); a checkpoint
loads straight onto a mesh.

XLA's device count is fixed when jax starts, so the check runs in a fresh interpreter."""

import os
import pathlib
import subprocess
import sys


def test_sharded_step_equals_single_device():
    script = pathlib.Path(__file__).parent / "scripts" / "sharded_step.py"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    meshes = ["data=8 fsdp=1 shard_adapters=False", "data=1 fsdp=8 shard_adapters=False",
              "data=2 fsdp=4 shard_adapters=True"]
    assert [line.split(":")[0] for line in lines] == meshes + [f"QLoRA {meshes[2]}", "from_pretrained data=2 fsdp=4"]
