/* Row kernels of the classifier shard's sparse update on the CPU (loaded by partial_fc/native/__init__.py).
 *
 * A sampled step touches ~r·C rows of weight and momentum.  With torch ops every stage of the
 * update (gather, conversion from bfloat16, gradient correction, SGD, stochastic rounding,
 * conversion back, scatter) is a pass over the rows with its own dispatch; here one loop per
 * row reads the row's weight, momentum and gradient once and writes weight and momentum back in
 * their storage dtype, which is the traffic any sparse update needs.
 *
 * The arithmetic is that of the torch ops it replaces, rounding for rounding: on CPUs with FMA
 * (x86-64 AVX2 and up, aarch64) ATen computes add(alpha=) and addcmul as one fused multiply-add
 * and mul then add as two roundings, so these loops call fmaf exactly there and are built with
 * -ffp-contract=off so that the compiler fuses nothing else.  Integers only in the rounding: bfloat16
 * is the upper half of a float32, round to nearest even adds 0x7FFF plus the kept low bit,
 * stochastic rounding adds 16 bits of noise (row draw XOR column draw, see partial_fc.rows).
 *
 * The same holds for the [N, c] passes of the cosines and the margin softmax (scale and clamp, the
 * cosine backward), except the softmax's exp and its row sums: the exp follows the polynomial
 * scheme of ATen's (within 1 ulp, not always the same bits) and the sums run over 16 lanes in a
 * fixed order, so that a row's result never depends on which thread computes it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline uint16_t f32_to_bf16_nearest(float f) {
    uint32_t u = bits_of(f);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded; /* NaN stays a quiet NaN, as torch converts it */
}

/* One row of d values from storage (float32 or bfloat16) as float32. */
static void load_row(float *restrict dst, const void *base, int64_t row, int64_t d, int32_t bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + row * d;
        for (int64_t k = 0; k < d; k++) dst[k] = bf16_to_f32(src[k]);
    } else {
        memcpy(dst, (const float *)base + row * d, (size_t)d * sizeof(float));
    }
}

/* One float32 row into storage; bfloat16 rounds stochastically when noise_row is given
 * (noise = noise_row XOR noise_col[k], uniform on [0, 2^16)), to nearest otherwise. */
static void store_row(void *base, int64_t row, int64_t d, int32_t bf16, const float *restrict src,
                      const int32_t *noise_row, const int32_t *restrict noise_col) {
    if (!bf16) {
        memcpy((float *)base + row * d, src, (size_t)d * sizeof(float));
        return;
    }
    uint16_t *restrict dst = (uint16_t *)base + row * d;
    if (noise_row != NULL) {
        const uint32_t r = (uint32_t)*noise_row;
        for (int64_t k = 0; k < d; k++) dst[k] = (uint16_t)((bits_of(src[k]) + (r ^ (uint32_t)noise_col[k])) >> 16);
    } else {
        for (int64_t k = 0; k < d; k++) dst[k] = f32_to_bf16_nearest(src[k]);
    }
}

/* rows[i] = storage[index[i]] as float32 (index NULL: row i), and norms[i] = ||rows[i]|| when
 * norms is not NULL. */
void sf_gather_rows(int64_t n, int64_t d, const int64_t *index, const void *storage, int32_t bf16,
                    float *out, float *norms) {
    for (int64_t i = 0; i < n; i++) {
        float *restrict row = out + i * d;
        load_row(row, storage, index != NULL ? index[i] : i, d, bf16);
        if (norms == NULL) continue;
        float lanes[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= d; k += 16)
            for (int l = 0; l < 16; l++) lanes[l] += row[k + l] * row[k + l];
        for (; k < d; k++) lanes[0] += row[k] * row[k];
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += lanes[l];
        norms[i] = sqrtf(sum);
    }
}

/* SGD with momentum on rows index[0..n) of weight and momentum storage [*, d] (torch.optim.SGD's
 * update, dampening 0), in place.
 *
 * owed:  NULL, or the factor [n] each stored weight row is multiplied by first (decay it still owes).
 * grad:  [n, d]; the gradient is (grad[i] - coef[i] * w[i]) * scale (coef NULL: grad * scale).
 * momentum_on: 0 leaves the momentum storage untouched (plain SGD).
 * w_noise_*, m_noise_*: stochastic-rounding draws of bfloat16 weight / momentum (NULL: nearest).
 * scratch: 3 * d floats. */
void sf_sgd_rows(int64_t n, int64_t d, const int64_t *index, void *weight, int32_t weight_bf16, void *momentum,
                 int32_t momentum_bf16, const float *owed, const float *grad, const float *coef,
                 float scale, float lr, float mu, float wd, int32_t momentum_on, int32_t nesterov,
                 const int32_t *w_noise_row, const int32_t *w_noise_col, const int32_t *m_noise_row,
                 const int32_t *m_noise_col, float *scratch) {
    float *restrict w = scratch, *restrict buf = scratch + d, *restrict out = scratch + 2 * d;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = index != NULL ? index[i] : i;
        load_row(w, weight, r, d, weight_bf16);
        if (owed != NULL) {
            const float f = owed[i];
            for (int64_t k = 0; k < d; k++) w[k] = w[k] * f;
        }
        const float *restrict g = grad + i * d;
        const float c = coef != NULL ? coef[i] : 0.0f;
        if (momentum_on) {
            load_row(buf, momentum, r, d, momentum_bf16);
            for (int64_t k = 0; k < d; k++) {
                float gk = coef != NULL ? fmaf(-w[k], c, g[k]) : g[k]; /* addcmul_(w, coef, value=-1) */
                gk = gk * scale;
                gk = fmaf(w[k], wd, gk);                               /* add_(w, alpha=wd) */
                const float b = buf[k] * mu + gk;                      /* mul_(mu).add_(g) */
                buf[k] = b;
                const float step = nesterov ? fmaf(b, mu, gk) : b;     /* add_(buf, alpha=mu) */
                out[k] = fmaf(step, -lr, w[k]);                        /* add_(step, alpha=-lr) */
            }
            store_row(momentum, r, d, momentum_bf16, buf, m_noise_row != NULL ? m_noise_row + i : NULL, m_noise_col);
        } else {
            for (int64_t k = 0; k < d; k++) {
                float gk = coef != NULL ? fmaf(-w[k], c, g[k]) : g[k];
                gk = gk * scale;
                gk = fmaf(w[k], wd, gk);
                out[k] = fmaf(gk, -lr, w[k]);
            }
        }
        store_row(weight, r, d, weight_bf16, out, w_noise_row != NULL ? w_noise_row + i : NULL, w_noise_col);
    }
}

/* The k indices of the largest of n non-negative float32 scores, ascending; of equal scores at
 * the boundary, the lowest indices (0 < k < n).  The bits of non-negative floats order as the
 * floats, so a radix select on the upper then the lower 16 bits finds the k-th largest in two
 * counting passes, and a third collects the indices in order: no sort.  hist: 65536 scratch. */
void sf_top_rows(int64_t n, const float *scores, int64_t k, int64_t *out, int64_t *hist) {
    const uint32_t *bits = (const uint32_t *)scores;
    memset(hist, 0, 65536 * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) hist[bits[i] >> 16]++;
    int64_t above = 0;
    int32_t high = 65535;
    for (; high > 0 && above + hist[high] < k; high--) above += hist[high];
    memset(hist, 0, 65536 * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++)
        if ((bits[i] >> 16) == (uint32_t)high) hist[bits[i] & 0xFFFFu]++;
    int32_t low = 65535;
    for (; low > 0 && above + hist[low] < k; low--) above += hist[low];
    const uint32_t threshold = ((uint32_t)high << 16) | (uint32_t)low;
    int64_t ties = k - above; /* scores equal to the threshold still to take */
    int64_t m = 0;
    for (int64_t i = 0; i < n && m < k; i++) {
        const uint32_t v = bits[i];
        if (v > threshold || (v == threshold && ties > 0)) {
            ties -= v == threshold;
            out[m++] = i;
        }
    }
}

/* exp(d) in float32 for the softmax's arguments (logit - row max, so d <= 0): reduction by ln 2 in
 * two parts (Cody-Waite) and a degree-6 polynomial, the scheme of SLEEF's expf_u10 that ATen's vector
 * exp uses, within 1 ulp of the exact value.  Below -87.3 the result is exp(-87.3) ~ 1.2e-38 rather
 * than a subnormal: next to the row maximum's exp(0) = 1 both vanish in any sum.  Written without
 * branches so that the loops calling it vectorise. */
static inline float exp_f32(float d) {
    const float x = d > -87.3f ? d : -87.3f; /* also the NaN case: converted to int below */
    const float q = rintf(x * 1.44269504088896341f);
    float s = fmaf(q, -0.693145751953125f, x);
    s = fmaf(q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    u = f32_of(bits_of(u) + ((uint32_t)(int32_t)q << 23)); /* times 2^q: q >= -126, a normal result */
    return d != d ? d : u;
}

/* clamp(r * inv_norm, -1, 1), a NaN staying NaN: torch's mul then clamp, rounding for rounding. */
static inline float clamped_cos(float r, float inv_norm) {
    const float v = r * inv_norm;
    return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

/* The scaled logit of a raw product r = unit . w (not yet divided by ||w||): s * clamped_cos. */
static inline float scaled_cos(float r, float inv_norm, float s) {
    return clamped_cos(r, inv_norm) * s;
}

/* cos[i][j] = clamp(cos[i][j] * inv_norm[j], -1, 1) in place on rows 0..n of [n, c]. */
void sf_scale_clamp_rows(int64_t n, int64_t c, float *cos, const float *restrict inv_norm) {
    for (int64_t i = 0; i < n; i++) {
        float *restrict ci = cos + i * c;
        for (int64_t j = 0; j < c; j++) ci[j] = clamped_cos(ci[j], inv_norm[j]);
    }
}

/* Max (m) of the scaled logits of raw[lo..hi), in 16 lanes (a local array the compiler keeps in a
 * vector register); NaNs are passed over (the exp then carries them into the sum). */
static void logit_max(const float *restrict raw, const float *restrict inv_norm, float s, int64_t lo, int64_t hi,
                      float *restrict lanes) {
    float m[16];
    memcpy(m, lanes, sizeof m);
    int64_t j = lo;
    for (; j + 16 <= hi; j += 16)
        for (int l = 0; l < 16; l++) {
            const float v = scaled_cos(raw[j + l], inv_norm[j + l], s);
            m[l] = v > m[l] ? v : m[l];
        }
    for (; j < hi; j++) {
        const float v = scaled_cos(raw[j], inv_norm[j], s);
        m[0] = v > m[0] ? v : m[0];
    }
    memcpy(lanes, m, sizeof m);
}

/* Sum of exp(logit - top) over raw[lo..hi), added to 16 lanes. */
static void logit_exp_sum(const float *restrict raw, const float *restrict inv_norm, float s, float top,
                          int64_t lo, int64_t hi, float *restrict lanes) {
    float acc[16];
    memcpy(acc, lanes, sizeof acc);
    int64_t j = lo;
    for (; j + 16 <= hi; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += exp_f32(scaled_cos(raw[j + l], inv_norm[j + l], s) - top);
    for (; j < hi; j++) acc[0] += exp_f32(scaled_cos(raw[j], inv_norm[j], s) - top);
    memcpy(lanes, acc, sizeof acc);
}

/* The scaled margin softmax's forward on rows 0..n of the raw products [n, c] (the cosine GEMM's
 * output before the division by ||w||): logits s * clamp(raw * inv_norm, -1, 1), except put[i] at
 * column col[i] where col[i] >= 0; row_max[i] = their maximum, sum_exp[i] = sum of exp(logit - max)
 * (16 lanes, a fixed order) and target_exp[i] = exp(put[i] - max) (0 where col[i] < 0).  Reads each
 * row twice while it is in cache and writes nothing of [n, c]: the backward recomputes the
 * exponentials (sf_softmax_cosine_grad_columns) instead of reading them back from memory. */
void sf_margin_sum_rows(int64_t n, int64_t c, const float *raw, const float *restrict inv_norm, float s,
                        const int64_t *col, const float *put, float *row_max, float *sum_exp, float *target_exp) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict ri = raw + i * c;
        const int64_t t = (col[i] >= 0 && col[i] < c) ? col[i] : c;
        float lanes[16];
        for (int l = 0; l < 16; l++) lanes[l] = -INFINITY;
        logit_max(ri, inv_norm, s, 0, t, lanes);
        if (t < c) {
            lanes[0] = put[i] > lanes[0] ? put[i] : lanes[0];
            logit_max(ri, inv_norm, s, t + 1, c, lanes);
        }
        float m = lanes[0];
        for (int l = 1; l < 16; l++) m = lanes[l] > m ? lanes[l] : m;
        float sums[16] = {0};
        logit_exp_sum(ri, inv_norm, s, m, 0, t, sums);
        float at_target = 0.0f;
        if (t < c) {
            at_target = exp_f32(put[i] - m);
            sums[0] += at_target;
            logit_exp_sum(ri, inv_norm, s, m, t + 1, c, sums);
        }
        float total = 0.0f;
        for (int l = 0; l < 16; l++) total += sums[l];
        row_max[i] = m;
        sum_exp[i] = total;
        target_exp[i] = at_target;
    }
}

/* The cosine's backward on columns [0, width) of g and cos [n, stride] (row-major):
 * g[i][j] *= inv_norm[j] in place, and coef[j] += g[i][j] * cos[i][j] summed over i in order.
 * Callers split the columns between threads; each column's sum is the same whatever the split. */
void sf_scale_dot_columns(int64_t n, int64_t width, int64_t stride, float *g, const float *cos,
                          const float *restrict inv_norm, float *restrict coef) {
    for (int64_t i = 0; i < n; i++) {
        float *restrict gi = g + i * stride;
        const float *restrict ci = cos + i * stride;
        for (int64_t j = 0; j < width; j++) {
            const float v = gi[j] * inv_norm[j];
            gi[j] = v;
            coef[j] += v * ci[j];
        }
    }
}

/* g' = exp(s * cos - m) * r * inv_norm over raw[lo..hi) in place, and coef += g' * cos. */
static void softmax_grad_span(float *restrict raw, const float *restrict inv_norm, float *restrict coef, float s,
                              float m, float r, int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; j++) {
        const float cs = clamped_cos(raw[j], inv_norm[j]);
        const float gj = (exp_f32(cs * s - m) * r) * inv_norm[j];
        raw[j] = gj;
        coef[j] += gj * cs;
    }
}

/* The softmax's and the cosine's backward in one pass, on columns [first, first + width) of the raw
 * products [n, stride] that sf_margin_sum_rows read (the pointers are at column first), replaced in
 * place by the gradient g' = dL/dcos / ||w||: with cos = clamp(raw * inv_norm, -1, 1),
 * g' = exp(s * cos - row_max[i]) * row_scale[i] * inv_norm[j], or target_grad[i] * inv_norm[j] at column
 * target[i]; and coef[j] += g' * cos summed over i in order (independent of the column split). */
void sf_softmax_cosine_grad_columns(int64_t n, int64_t width, int64_t stride, float *raw,
                                    const float *restrict inv_norm, float *restrict coef, float s,
                                    const float *row_max, const float *row_scale, const int64_t *target,
                                    const float *target_grad, int64_t first) {
    for (int64_t i = 0; i < n; i++) {
        float *ri = raw + i * stride;
        const int64_t t = target[i] - first; /* outside [0, width): not in these columns */
        const int64_t cut = (t >= 0 && t < width) ? t : width;
        softmax_grad_span(ri, inv_norm, coef, s, row_max[i], row_scale[i], 0, cut);
        if (cut < width) {
            const float cs = clamped_cos(ri[cut], inv_norm[cut]);
            const float gj = target_grad[i] * inv_norm[cut];
            ri[cut] = gj;
            coef[cut] += gj * cs;
            softmax_grad_span(ri, inv_norm, coef, s, row_max[i], row_scale[i], cut + 1, width);
        }
    }
}
