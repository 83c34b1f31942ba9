// The WKV-7 scan on the GPU: forward and backstepping backward, the same algorithm as the CPU
// operator in src/lib/model/wkv.rs (its reference twin, which also defines the packing):
//
//   w_t  = exp(-e^{-1/2} σ(ŵ_t)),  sa_t = S_{t-1} a_t,
//   S_t  = S_{t-1} diag(w_t) + sa_t b_tᵀ + v_t k_tᵀ,   y_t = S_t r_t
//
// S is N×N, indexed [i = value channel, j = key channel]; N = 64. Inputs are packed
// [6,B,T,H,N] in the order r, ŵ, k, v, a, b (f32 or bf16), the state [B,H,N,N] f32 row-major.
// One thread block per (batch, head) and one thread per value channel i, as the official kernel.
//
// Forward: thread i keeps row i of S in registers. It writes y, the final state, and a tape for
// the backward: every sa_t, and a copy of the state after every 16th step and after the last
// (stored transposed, ck[j·N + i] = S[i][j], so that the writes are coalesced).
//
// Backward (the official kernel's backstepping), t = T−1 … 0: thread i keeps column i of S
// (S[:,i]) and both row i and column i of dS, so that every sum it needs runs over its own
// registers: the key-indexed gradients (dr, dk, db, dŵ, da) are sums over a column, the
// value-indexed ones (dv, dsa) over a row. The two copies of dS are updated by the same
// expressions (explicit fmaf) and stay equal to the bit. S_{t−1} comes from inverting the update,
// S_{t−1} = (S_t − v kᵀ − sa bᵀ) diag(1/w), except at a checkpoint or s0, which are read exactly:
// at most 15 inversions in a row.

#define N 64
#define CHUNK 16
#define EXP_NEG_HALF 0.60653066f

typedef unsigned short bf16_t;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ void from_f32(float x, float *dst) { *dst = x; }
// Round to nearest even (NaN stays NaN: its mantissa keeps a high bit).
__device__ __forceinline__ void from_f32(float x, bf16_t *dst) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *dst = (bf16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    *dst = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename F>
__device__ void wkv7_forward(int B, int T, int H, const F *__restrict__ x,
                             const float *__restrict__ s0, F *__restrict__ y,
                             float *__restrict__ s_t, float *__restrict__ sa_tape,
                             float *__restrict__ ck) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const size_t m = (size_t)B * T * H * N;
    const F *r = x, *wr = x + m, *k = x + 2 * m, *v = x + 3 * m, *a = x + 4 * m, *bb = x + 5 * m;
    const int nck = (T + CHUNK - 1) / CHUNK;
    __shared__ float sr[N], sw[N], sk[N], sa_in[N], sb[N];
    float s[N];
#pragma unroll
    for (int j = 0; j < N; j++) s[j] = s0[(size_t)bh * N * N + i * N + j];
    for (int t = 0; t < T; t++) {
        const size_t o = ((size_t)(b * T + t) * H + h) * N + i;
        __syncthreads();
        sr[i] = to_f32(r[o]);
        sw[i] = expf(-EXP_NEG_HALF * sigmoid_f(to_f32(wr[o])));
        sk[i] = to_f32(k[o]);
        sa_in[i] = to_f32(a[o]);
        sb[i] = to_f32(bb[o]);
        const float vi = to_f32(v[o]);
        __syncthreads();
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) sa = fmaf(s[j], sa_in[j], sa);
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            s[j] = fmaf(sw[j], s[j], fmaf(sb[j], sa, vi * sk[j]));
            acc = fmaf(sr[j], s[j], acc);
        }
        from_f32(acc, &y[o]);
        sa_tape[((size_t)bh * T + t) * N + i] = sa;
        if ((t + 1) % CHUNK == 0 || t + 1 == T) {
            float *c = ck + ((size_t)bh * nck + t / CHUNK) * N * N;
#pragma unroll
            for (int j = 0; j < N; j++) c[j * N + i] = s[j];
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) s_t[(size_t)bh * N * N + i * N + j] = s[j];
}

template <typename F>
__device__ void wkv7_backward(int B, int T, int H, const F *__restrict__ x,
                              const float *__restrict__ s0, const float *__restrict__ sa_tape,
                              const float *__restrict__ ck, const F *__restrict__ dy,
                              const float *__restrict__ ds_t, F *__restrict__ dx,
                              float *__restrict__ ds0) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const size_t m = (size_t)B * T * H * N, nn = (size_t)N * N;
    const F *r = x, *wr = x + m, *k = x + 2 * m, *v = x + 3 * m, *a = x + 4 * m, *bb = x + 5 * m;
    const int nck = (T + CHUNK - 1) / CHUNK;
    __shared__ float sr[N], sw[N], sk[N], sv[N], sa_in[N], sb[N], ssa[N], sdy[N], sdsa[N];
    float st[N], dsr[N], dsc[N];  // S[:,i], dS[i,:], dS[:,i]
    const float *last = ck + ((size_t)bh * nck + nck - 1) * nn;
#pragma unroll
    for (int j = 0; j < N; j++) {
        st[j] = last[i * N + j];
        dsr[j] = ds_t[bh * nn + i * N + j];
        dsc[j] = ds_t[bh * nn + j * N + i];
    }
    for (int t = T - 1; t >= 0; t--) {
        const size_t o = ((size_t)(b * T + t) * H + h) * N + i;
        __syncthreads();
        const float ri = to_f32(r[o]), ki = to_f32(k[o]), ai = to_f32(a[o]), bi = to_f32(bb[o]);
        const float sig = sigmoid_f(to_f32(wr[o]));
        const float wi = expf(-EXP_NEG_HALF * sig);
        const float dyi = to_f32(dy[o]), sai = sa_tape[((size_t)bh * T + t) * N + i];
        sr[i] = ri; sw[i] = wi; sk[i] = ki; sv[i] = to_f32(v[o]); sa_in[i] = ai; sb[i] = bi;
        ssa[i] = sai; sdy[i] = dyi;
        __syncthreads();
        // dS += dy rᵀ; dr = S_tᵀ dy; dv = dS k; dsa = dS b.
        float dr = 0.f, dv = 0.f, dsa = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            dsr[j] = fmaf(dyi, sr[j], dsr[j]);
            dsc[j] = fmaf(sdy[j], ri, dsc[j]);
            dr = fmaf(st[j], sdy[j], dr);
            dv = fmaf(dsr[j], sk[j], dv);
            dsa = fmaf(dsr[j], sb[j], dsa);
        }
        sdsa[i] = dsa;
        // S_{t-1}: exact where it was saved (or is s0), else the inverted update.
        if (t == 0) {
#pragma unroll
            for (int j = 0; j < N; j++) st[j] = s0[bh * nn + j * N + i];
        } else if (t % CHUNK == 0) {
            const float *c = ck + ((size_t)bh * nck + t / CHUNK - 1) * nn;
#pragma unroll
            for (int j = 0; j < N; j++) st[j] = c[i * N + j];
        } else {
            const float winv = 1.0f / wi;
#pragma unroll
            for (int j = 0; j < N; j++)
                st[j] = (st[j] - sv[j] * ki - ssa[j] * bi) * winv;
        }
        __syncthreads();
        // dk = dSᵀ v; db = dSᵀ sa; dmul = colsum(dS ⊙ S_{t-1}); da = S_{t-1}ᵀ dsa;
        // dS ← dS diag(w) + dsa aᵀ.
        float dk = 0.f, db = 0.f, dmul = 0.f, da = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            dk = fmaf(dsc[j], sv[j], dk);
            db = fmaf(dsc[j], ssa[j], db);
            dmul = fmaf(dsc[j], st[j], dmul);
            da = fmaf(st[j], sdsa[j], da);
            dsr[j] = fmaf(dsr[j], sw[j], __fmul_rn(dsa, sa_in[j]));
            dsc[j] = fmaf(dsc[j], wi, __fmul_rn(sdsa[j], ai));
        }
        const float dw = dmul * (-EXP_NEG_HALF * wi * sig * (1.0f - sig));
        from_f32(dr, &dx[o]);
        from_f32(dw, &dx[m + o]);
        from_f32(dk, &dx[2 * m + o]);
        from_f32(dv, &dx[3 * m + o]);
        from_f32(da, &dx[4 * m + o]);
        from_f32(db, &dx[5 * m + o]);
    }
#pragma unroll
    for (int j = 0; j < N; j++) ds0[bh * nn + j * N + i] = dsc[j];
}

// Entry points, one per input type. Launch: grid B·H, block N = 64 threads.
extern "C" __global__ void wkv7_fwd_f32(int B, int T, int H, const float *x, const float *s0,
                                        float *y, float *s_t, float *sa_tape, float *ck) {
    wkv7_forward<float>(B, T, H, x, s0, y, s_t, sa_tape, ck);
}
extern "C" __global__ void wkv7_fwd_bf16(int B, int T, int H, const bf16_t *x, const float *s0,
                                         bf16_t *y, float *s_t, float *sa_tape, float *ck) {
    wkv7_forward<bf16_t>(B, T, H, x, s0, y, s_t, sa_tape, ck);
}
extern "C" __global__ void wkv7_bwd_f32(int B, int T, int H, const float *x, const float *s0,
                                        const float *sa_tape, const float *ck, const float *dy,
                                        const float *ds_t, float *dx, float *ds0) {
    wkv7_backward<float>(B, T, H, x, s0, sa_tape, ck, dy, ds_t, dx, ds0);
}
extern "C" __global__ void wkv7_bwd_bf16(int B, int T, int H, const bf16_t *x, const float *s0,
                                         const float *sa_tape, const float *ck, const bf16_t *dy,
                                         const float *ds_t, bf16_t *dx, float *ds0) {
    wkv7_backward<bf16_t>(B, T, H, x, s0, sa_tape, ck, dy, ds_t, dx, ds0);
}
