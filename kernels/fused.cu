// Fused element-wise operators of the model on the GPU, the twins of the CPU ops in
// src/lib/model/fused.rs (whose composed candle forms are the reference): group/layer norm and the
// token-shift mix, forward and backward. Each replaces a dozen candle kernels (and their
// intermediate tensors) by one pass over the activations.
//
// Column sums over rows (the gradients of per-channel weights) are taken per thread over a slice
// of the rows and added into the zeroed output with one atomicAdd per thread: the order of those
// few hundred additions per channel varies between runs (the GPU path is not bit-reproducible).

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Norm over groups of G consecutive channels of rows of C channels (LayerNorm: G = C), then
// · w + b per channel: the twin of `norm_rows`. One warp per (row, group) item; lane l holds
// channels l, l + 32, ... of its group (G a multiple of 32, at most 32·K). The warps of the grid
// step through the items by a stride that is a multiple of C/G, so each warp always sees the same
// channels (the backward's dw/db partials stay per lane).
template <int K>
__device__ void norm_fwd(unsigned long long items, int G, int C, float eps, const float *x,
                         const float *w, const float *b, float *y) {
    const int lane = threadIdx.x & 31;
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);
    const int per = G / 32;
    for (unsigned long long it = blockIdx.x * (unsigned long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
         it < items; it += warps) {
        const float *xg = x + it * G;
        const int c0 = (int)(it % (unsigned long long)(C / G)) * G;
        float v[K];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            v[k] = k < per ? xg[lane + 32 * k] : 0.f;
            s += v[k];
        }
        const float mean = warp_sum(s) / G;
        float q = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const float d = k < per ? v[k] - mean : 0.f;
            q = fmaf(d, d, q);
        }
        const float rstd = rsqrtf(warp_sum(q) / G + eps);
#pragma unroll
        for (int k = 0; k < K; k++) {
            if (k < per) {
                const int j = lane + 32 * k;
                y[it * G + j] = (v[k] - mean) * rstd * w[c0 + j] + b[c0 + j];
            }
        }
    }
}

// The backward of norm_fwd: dx, and dw, db (zeroed by the caller) accumulated per warp over its
// items and added with one atomicAdd per lane and channel.
template <int K>
__device__ void norm_bwd(unsigned long long items, int G, int C, float eps, const float *x,
                         const float *w, const float *dy, float *dx, float *dw, float *db) {
    const int lane = threadIdx.x & 31;
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);
    const int per = G / 32;
    const unsigned long long first = blockIdx.x * (unsigned long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (first >= items) return;
    const int c0 = (int)(first % (unsigned long long)(C / G)) * G;
    float pdw[K], pdb[K];
#pragma unroll
    for (int k = 0; k < K; k++) pdw[k] = pdb[k] = 0.f;
    for (unsigned long long it = first; it < items; it += warps) {
        const float *xg = x + it * G, *dyg = dy + it * G;
        float v[K], g[K];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            v[k] = k < per ? xg[lane + 32 * k] : 0.f;
            g[k] = k < per ? dyg[lane + 32 * k] : 0.f;
            s += v[k];
        }
        const float mean = warp_sum(s) / G;
        float q = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const float d = k < per ? v[k] - mean : 0.f;
            q = fmaf(d, d, q);
        }
        const float rstd = rsqrtf(warp_sum(q) / G + eps);
        // x̂ = (x − μ)·rstd;  ĝ = dy·w;  dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            if (k < per) {
                const int j = lane + 32 * k;
                const float xh = (v[k] - mean) * rstd;
                const float gh = g[k] * w[c0 + j];
                pdw[k] = fmaf(g[k], xh, pdw[k]);
                pdb[k] += g[k];
                v[k] = xh;
                g[k] = gh;
                sg += gh;
                sgx = fmaf(gh, xh, sgx);
            }
        }
        const float mg = warp_sum(sg) / G, mgx = warp_sum(sgx) / G;
#pragma unroll
        for (int k = 0; k < K; k++) {
            if (k < per) dx[it * G + lane + 32 * k] = rstd * (g[k] - mg - v[k] * mgx);
        }
    }
#pragma unroll
    for (int k = 0; k < K; k++) {
        if (k < per) {
            atomicAdd(&dw[c0 + lane + 32 * k], pdw[k]);
            atomicAdd(&db[c0 + lane + 32 * k], pdb[k]);
        }
    }
}

// K = 32 covers groups of up to 1024 channels.
extern "C" __global__ void norm_fwd_f32(unsigned long long items, int G, int C, float eps,
                                        const float *x, const float *w, const float *b, float *y) {
    if (G <= 128) norm_fwd<4>(items, G, C, eps, x, w, b, y);
    else if (G <= 512) norm_fwd<16>(items, G, C, eps, x, w, b, y);
    else norm_fwd<32>(items, G, C, eps, x, w, b, y);
}

extern "C" __global__ void norm_bwd_f32(unsigned long long items, int G, int C, float eps,
                                        const float *x, const float *w, const float *dy, float *dx,
                                        float *dw, float *db) {
    if (G <= 128) norm_bwd<4>(items, G, C, eps, x, w, dy, dx, dw, db);
    else if (G <= 512) norm_bwd<16>(items, G, C, eps, x, w, dy, dx, dw, db);
    else norm_bwd<32>(items, G, C, eps, x, w, dy, dx, dw, db);
}

// Token shift and lerp, the twin of MixOp: y = x + (p − x)·μ, with p the previous row of the same
// sequence (prev[b] for the first of each). R = B·T rows of C channels.
extern "C" __global__ void mix_fwd_f32(unsigned long long rows, int T, int C, const float *x,
                                       const float *prev, const float *mu, float *y) {
    const unsigned long long n = rows * C;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long r = i / C;
        const int c = (int)(i % C);
        const float p = r % T == 0 ? prev[(r / T) * C + c] : x[i - C];
        y[i] = x[i] + (p - x[i]) * mu[c];
    }
}

// The backward: dx = dy·(1 − μ) + dy_next·μ (row r is also the previous row of r + 1 within its
// sequence), dprev[b] = dy[first row of b]·μ, dmu = Σ_r dy·(p − x). Thread (c, slice) walks the
// rows of its slice for channel c; dmu (zeroed by the caller) gets one atomicAdd per thread.
extern "C" __global__ void mix_bwd_f32(unsigned long long rows, int T, int C, int rows_per_slice,
                                       const float *x, const float *prev, const float *mu,
                                       const float *dy, float *dx, float *dprev, float *dmu) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_slice;
    const unsigned long long r1 = min(rows, r0 + rows_per_slice);
    const float m = mu[c];
    float acc = 0.f;
    for (unsigned long long r = r0; r < r1; r++) {
        const unsigned long long i = r * C + c;
        const bool first = r % T == 0;
        const float p = first ? prev[(r / T) * C + c] : x[i - C];
        acc = fmaf(dy[i], p - x[i], acc);
        float d = dy[i] * (1.0f - m);
        if (r % T + 1 < (unsigned long long)T) d = fmaf(dy[i + C], m, d);
        dx[i] = d;
        if (first) dprev[(r / T) * C + c] = dy[i] * m;
    }
    atomicAdd(&dmu[c], acc);
}

// Block-wide max and sum over blockDim.x threads (a multiple of 32, at most 1024).
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float part[32];
    __shared__ float result;
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : (is_max ? -INFINITY : 0.f);
        for (int o = 16; o > 0; o >>= 1) {
            const float u = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, u) : v + u;
        }
        if (lane == 0) result = v;
    }
    __syncthreads();
    return result;
}

// Masked cross-entropy, the twin of `xent_in_place`: one block per row of V logits. Writes
// d = (softmax − onehot(target))·w_r (the gradient of the loss for upstream gradient 1) and adds
// w_r·(−log p(target)) to loss[0] (zeroed by the caller) with one atomicAdd per row.
extern "C" __global__ void xent_f32(int V, const float *logits, const unsigned int *targets,
                                    const float *weights, float *d, float *loss) {
    const size_t r = blockIdx.x;
    const float *row = logits + r * V;
    float *drow = d + r * V;
    const float w = weights[r];
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce(m, true);
    float s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(row[j] - m);
    s = block_reduce(s, false);
    const float scale = w / s;
    for (int j = threadIdx.x; j < V; j += blockDim.x) drow[j] = w == 0.f ? 0.f : expf(row[j] - m) * scale;
    __syncthreads();
    if (threadIdx.x == 0 && w != 0.f) {
        const unsigned int t = targets[r];
        drow[t] -= w;
        atomicAdd(loss, w * (m + logf(s) - row[t]));
    }
}

// relu(x)², elementwise.
extern "C" __global__ void relu_sq_f32(unsigned long long n, const float *x, float *y) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float r = fmaxf(x[i], 0.f);
        y[i] = r * r;
    }
}

// TimeMix's preparation of the scan inputs (steps 3–8 as src/lib/model/rwkv7.rs numbers them),
// the twin of `prep_row` in src/lib/model/tmix.rs: from the activation planes
// [r, wl, k, v, al, (vl, v_first)] (`P` planes of R×C) and the parameter rows
// [w0, a0, v0, k_k, k_a] (C each) to the six scan inputs [r, ŵ, k', v', −κ̂, κ̂·a] (6 planes of
// R×C). One warp per (row, head) of N = 32·E channels: the key normalisation is a sum over the
// head.
template <int E>
__device__ void prep_fwd(unsigned long long R, int H, int C, int residual, const float *acts,
                         const float *prm, float *out) {
    const int lane = threadIdx.x & 31, N = 32 * E;
    const unsigned long long RC = R * C, items = R * H;
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);
    const float *w0 = prm, *a0 = prm + C, *v0 = prm + 2 * C, *k_k = prm + 3 * C, *k_a = prm + 4 * C;
    for (unsigned long long it = blockIdx.x * (unsigned long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
         it < items; it += warps) {
        const unsigned long long row = it / H;
        const int h = (int)(it % H);
        float kkr[E], a[E], ss = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int j = h * N + lane + 32 * e;
            const unsigned long long i = row * C + j;
            const float k = acts[2 * RC + i], v = acts[3 * RC + i];
            out[i] = acts[i];
            out[RC + i] = acts[RC + i] + w0[j];
            float vp = v;
            if (residual) {
                const float nu = 1.f / (1.f + expf(-(acts[5 * RC + i] + v0[j])));
                vp = v + (acts[6 * RC + i] - v) * nu;
            }
            out[3 * RC + i] = vp;
            a[e] = 1.f / (1.f + expf(-(acts[4 * RC + i] + a0[j])));
            out[2 * RC + i] = k * (1.f + (a[e] - 1.f) * k_a[j]);
            kkr[e] = k * k_k[j];
            ss = fmaf(kkr[e], kkr[e], ss);
        }
        const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
#pragma unroll
        for (int e = 0; e < E; e++) {
            const unsigned long long i = row * C + h * N + lane + 32 * e;
            const float kappa = kkr[e] * inv;
            out[4 * RC + i] = -kappa;
            out[5 * RC + i] = kappa * a[e];
        }
    }
}

// The backward: dacts (P planes) and dprm (5 rows, zeroed by the caller; per-lane partials over
// the warp's items, which all have the same head because the grid stride is a multiple of H).
template <int E>
__device__ void prep_bwd(unsigned long long R, int H, int C, int residual, const float *acts,
                         const float *prm, const float *dout, float *dacts, float *dprm) {
    const int lane = threadIdx.x & 31, N = 32 * E;
    const unsigned long long RC = R * C, items = R * H;
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);
    const float *a0 = prm + C, *v0 = prm + 2 * C, *k_k = prm + 3 * C, *k_a = prm + 4 * C;
    const unsigned long long first = blockIdx.x * (unsigned long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (first >= items) return;
    const int h = (int)(first % H);
    float pw0[E], pa0[E], pv0[E], pkk[E], pka[E];
#pragma unroll
    for (int e = 0; e < E; e++) pw0[e] = pa0[e] = pv0[e] = pkk[e] = pka[e] = 0.f;
    for (unsigned long long it = first; it < items; it += warps) {
        const unsigned long long row = it / H;
        float kkr[E], a[E], dkap[E], k[E], ss = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int j = h * N + lane + 32 * e;
            const unsigned long long i = row * C + j;
            k[e] = acts[2 * RC + i];
            a[e] = 1.f / (1.f + expf(-(acts[4 * RC + i] + a0[j])));
            kkr[e] = k[e] * k_k[j];
            ss = fmaf(kkr[e], kkr[e], ss);
        }
        const float norm = sqrtf(warp_sum(ss));
        const float n = fmaxf(norm, 1e-12f);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int j = h * N + lane + 32 * e;
            const unsigned long long i = row * C + j;
            const float kappa = kkr[e] / n;
            dkap[e] = -dout[4 * RC + i] + dout[5 * RC + i] * a[e];
            dot = fmaf(dkap[e], kappa, dot);
            // r, ŵ.
            dacts[i] = dout[i];
            dacts[RC + i] = dout[RC + i];
            pw0[e] += dout[RC + i];
            // v' = v + (v_first − v)·ν.
            const float dvp = dout[3 * RC + i], v = acts[3 * RC + i];
            if (residual) {
                const float nu = 1.f / (1.f + expf(-(acts[5 * RC + i] + v0[j])));
                const float vf = acts[6 * RC + i];
                const float dnu = dvp * (vf - v) * nu * (1.f - nu);
                dacts[3 * RC + i] = dvp * (1.f - nu);
                dacts[6 * RC + i] = dvp * nu;
                dacts[5 * RC + i] = dnu;
                pv0[e] += dnu;
            } else {
                dacts[3 * RC + i] = dvp;
            }
            // k' = k·(1 + (a − 1)·k_a);  κ̂·a;  a = σ(al + a0).
            const float dkp = dout[2 * RC + i];
            const float da = dout[5 * RC + i] * kappa + dkp * k[e] * k_a[j];
            pka[e] = fmaf(dkp * k[e], a[e] - 1.f, pka[e]);
            const float dal = da * a[e] * (1.f - a[e]);
            dacts[4 * RC + i] = dal;
            pa0[e] += dal;
            dacts[2 * RC + i] = dkp * (1.f + (a[e] - 1.f) * k_a[j]);
        }
        dot = warp_sum(dot);
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int j = h * N + lane + 32 * e;
            const unsigned long long i = row * C + j;
            // κ̂ = k_k·k / max(‖k_k·k‖, ε): the clamp passes no gradient to the norm.
            const float dkkr = norm > 1e-12f ? (dkap[e] - kkr[e] / n * dot) / n : dkap[e] / n;
            dacts[2 * RC + i] += dkkr * k_k[j];
            pkk[e] = fmaf(dkkr, k[e], pkk[e]);
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int j = h * N + lane + 32 * e;
        atomicAdd(&dprm[j], pw0[e]);
        atomicAdd(&dprm[C + j], pa0[e]);
        atomicAdd(&dprm[2 * C + j], pv0[e]);
        atomicAdd(&dprm[3 * C + j], pkk[e]);
        atomicAdd(&dprm[4 * C + j], pka[e]);
    }
}

extern "C" __global__ void prep_fwd_f32(unsigned long long R, int H, int N, int residual,
                                        const float *acts, const float *prm, float *out) {
    const int C = H * N;
    if (N == 64) prep_fwd<2>(R, H, C, residual, acts, prm, out);
    else if (N == 32) prep_fwd<1>(R, H, C, residual, acts, prm, out);
    else prep_fwd<4>(R, H, C, residual, acts, prm, out);
}

extern "C" __global__ void prep_bwd_f32(unsigned long long R, int H, int N, int residual,
                                        const float *acts, const float *prm, const float *dout,
                                        float *dacts, float *dprm) {
    const int C = H * N;
    if (N == 64) prep_bwd<2>(R, H, C, residual, acts, prm, dout, dacts, dprm);
    else if (N == 32) prep_bwd<1>(R, H, C, residual, acts, prm, dout, dacts, dprm);
    else prep_bwd<4>(R, H, C, residual, acts, prm, dout, dacts, dprm);
}
