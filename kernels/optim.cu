// The optimiser step on the GPU: AdamW applied in place (the twin of `AdamW::update` in
// src/lib/train/optim.rs) and the gradient's sum of squares for global-norm clipping.

// m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  p ← p·decay − step_size·m / (√v / bc2_sqrt + eps),
// with g = gscale·grad (gscale folds clipping and gradient accumulation into this one pass).
extern "C" __global__ void adamw_f32(unsigned long long n, float *p, const float *grad, float *m,
                                     float *v, float gscale, float beta1, float beta2, float eps,
                                     float step_size, float bc2_sqrt, float decay) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = gscale * grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// out[slot] += Σ g² over n elements (out zeroed by the caller; one slot per parameter).
extern "C" __global__ void sumsq_f32(unsigned long long n, const float *g, float *out,
                                     unsigned int slot) {
    __shared__ float part[32];
    float acc = 0.f;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        acc = fmaf(g[i], g[i], acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        acc = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (threadIdx.x == 0) atomicAdd(&out[slot], acc);
    }
}
