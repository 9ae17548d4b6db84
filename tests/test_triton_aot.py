"""Every default Triton config of the backend compiled ahead of time for sm_80 and sm_90a at the Crab+ shapes, no GPU
needed (issue 12, "Checks that run in CI without a GPU"): a config that spills registers or needs more shared memory
than the target gives one block fails. The report (``python -m ilora_kernels.ops.triton_aot``) runs once, in a fresh
process, because this one runs Triton under its interpreter; about 70 s on 2 cores (``-m "not slow"`` deselects it).
It skips only when Triton's CUDA backend cannot compile here (no ptxas)."""

import pytest
import torch

pytest.importorskip("triton")

from ilora_kernels.ops import triton_aot  # noqa: E402

KERNELS = {"_shrink_route_kernel", "_shrink_route_partial_kernel", "_route_reduce_kernel", "_base_expand_kernel",
           "_expand_backward_kernel", "_shrink_backward_kernel", "_dx_kernel"}


@pytest.fixture(scope="module")
def report():
    status, rows, output = triton_aot.report_in_subprocess()
    if status == 3:
        pytest.skip(output.strip().splitlines()[-1] if output.strip() else "Triton cannot compile for CUDA here")
    print(output)
    return status, rows, output


@pytest.mark.slow
def test_no_default_config_spills_or_exceeds_shared_memory(report):
    status, rows, output = report
    assert rows, output
    failed = [f"{r['kernel']} [{r['config']}] {r['variant']} {r['target']}: {'; '.join(r['problems'])}"
              for r in rows if r["failed"]]
    assert not failed, "\n".join(failed) + "\n\n" + output
    assert status == 0, output


@pytest.mark.slow
def test_report_covers_every_kernel_config_and_target(report):
    from ilora_kernels.ops import triton_ilora

    _, rows, output = report
    assert {r["kernel"] for r in rows} == KERNELS, output
    assert {r["target"] for r in rows} == set(triton_aot.TARGETS)
    for target in triton_aot.TARGETS:
        compiled = {r["config"] for r in rows if r["kernel"] == "_base_expand_kernel" and r["target"] == target}
        assert {triton_aot._gemm_label(c) for c in triton_ilora._gemm_configs()} <= compiled
    # the opt-in fused-V expand backward is compiled and reported, never enforced; everything else is
    opt_in = [r for r in rows if not r["enforced"]]
    assert opt_in and all(r["kernel"] == "_expand_backward_kernel" and r["roles"] == ["opt-in"] for r in opt_in)
    assert all(r["regs"] > 0 and r["smem"] >= 0 for r in rows)


def test_launches_pass_every_kernel_argument():
    """The report's launch lists name exactly the kernels' parameters (cheap: nothing is compiled)."""
    from ilora_kernels.ops import triton_ilora

    seen = set()
    splits = set()
    for launch in triton_aot.crab_launches(triton_ilora, [torch.bfloat16], sms=132):
        if launch.kernel == "_route_reduce_kernel":
            splits.add((launch.where, launch.args["SPLIT"]))
        kernel = getattr(triton_ilora, launch.kernel)
        names = set(launch.args) | set(launch.options)
        assert set(kernel.arg_names) <= names and names - set(kernel.arg_names) <= {"num_warps", "num_stages"}, \
            launch.kernel
        seen.add(launch.kernel)
    assert seen == KERNELS
    # the split shrink-route at every Crab+ shape with N = 4096, with the SPLIT the auto rule picks on an H100
    assert {split for _, split in splits} == {4}
    assert {where.split()[0] for where, _ in splits} == {name for name, *_ in triton_aot.CRAB_SHAPES}
    assert all(where.endswith("N=4096") for where, _ in splits)
