"""One comparison for every check: relative error against a float64 reference."""

import torch

# ||out - ref|| / ||ref|| allowed per dtype of the tested result.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def relative_error(out, ref):
    """||out - ref|| / ||ref|| over the finite entries, in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    scale = ref[finite].norm()
    diff = (out[finite] - ref[finite]).norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def assert_close(out, ref, tolerance=None, name="result"):
    """Shapes equal, NaN and inf in the same places, relative error within tolerance."""
    tolerance = TOLERANCE[out.dtype] if tolerance is None else tolerance
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out_c, ref_c = out.detach().cpu(), ref.detach().cpu()
    for what, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
        mismatch = test(out_c) != test(ref_c)
        if mismatch.any():
            where = mismatch.nonzero()[:5].tolist()
            raise AssertionError(
                f"{name}: {what} placement differs at {int(mismatch.sum())} entries, first {where}"
            )
    error = relative_error(out, ref)
    assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.3g}"
