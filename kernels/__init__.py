"""Fused Nadaraya-Watson kernels: pure compute, no argument parsing.

Every backend module (``numba_nw`` for CPU, ``triton_nw`` for GPU) exposes the
same four functions on canonical, already-checked torch tensors of one float
dtype, one device, contiguous:

Shared keys::

    forward(query, key, value, w, exclude_self) -> (out, lse)
        query (B, n, d), key (B, m, d), value (B, m, c), w (B, m)
        out (B, n, c) in the input dtype
        lse (B, n): natural-log log-sum-exp of s_ij over j, float64 for float64
        inputs and float32 otherwise

    backward(grad_out, query, key, value, w, out, lse, exclude_self, needs)
        -> (dquery, dkey, dvalue, dw)
        grad_out (B, n, c); needs is four bools (query, key, value, w); an
        entry that is not needed may come back as None.

Per-query rows::

    forward_rows(query, keys, values, w) -> (out, lse)
        query (n,), keys (n, m), values (n, m), w (m,); out (n,), lse (n,)

    backward_rows(grad_out, query, keys, values, w, out, lse, needs)
        -> (dquery, dkeys, dvalues, dw)

with s_ij = -(w_j / 2) * ||q_i - k_j||^2, p_ij = softmax_j(s_ij), out_i =
sum_j p_ij v_j. Scalar bandwidths arrive expanded to one w per key. Nothing of
size n * m is allocated beyond the rows layout's own inputs and gradients.
"""
