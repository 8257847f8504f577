// cpu_gemv.c: decode kernels that stream the weights at the memory bandwidth where fp32 dequantization cannot
// (AVX2 without AVX-512), plus the bf16-weight GEMV every build uses. Built into the same library as cpu_kernels.c.
//
// The int16 path (why and its numbers: docs/ARCHITECTURE.md, "CPU kernels on AVX2"): converting every 4-bit code to
// fp32 costs ~1 vector op per weight, which on AVX2 is compute-bound at a quarter of the bandwidth. Here the
// activations are quantized per block to int16 (|error| <= 2^-16 of the block's max), the 4-bit weights become int16
// through a byte shuffle (bnb: the 16-entry table at 13 bits, |error| <= 2^-14 of absmax; GPTQ: the integer codes
// themselves, exact), and VPMADDWD multiplies and adds pairs into int32, exactly. One fp32 FMA per block rescales.
// This is not llama.cpp's int8 activation path (2^-8): the error stays far below bf16 rounding (2^-9 relative).
#include "cpu_simd.h"

#define BNB_BLOCK 64
#define BNB_NESTED 256
#define T16_ONE 8191.0f  // the 4-bit table's 1.0 in int16: 8 products of 8191 x 32767 per lane stay below 2^31
#define X16_ONE 32767.0f

int lq_i16_ok(void) { return V == 8; }  // AVX2 builds (AVX-512 ones stream fp32 at the bandwidth already)

// activations (M, K) -> int16 per block of B with one fp32 scale each (xs = max|x| / 32767), and optionally the
// block sums of the int16 values
__attribute__((unused)) static void quantize_x16(const float *x, int64_t M, int64_t K, int64_t B, int16_t *xq, float *xs, int32_t *xsum) {
    const int64_t nb = K / B;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + m * K + b * B;
            float a = 0.0f;
            for (int64_t i = 0; i < B; i++) a = __builtin_fabsf(v[i]) > a ? __builtin_fabsf(v[i]) : a;
            const float inv = a > 0.0f ? X16_ONE / a : 0.0f;
            int32_t s = 0;
            int16_t *q = xq + m * K + b * B;
            for (int64_t i = 0; i < B; i++) {
                q[i] = (int16_t)__builtin_nearbyintf(v[i] * inv);
                s += q[i];
            }
            xs[m * nb + b] = a / X16_ONE;
            if (xsum) xsum[m * nb + b] = s;
        }
}

#if V == 8
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// ---- bitsandbytes 4-bit ----------------------------------------------------------------------------------------
// 32 bytes of a row hold one block's 64 codes: byte j has element 2j in its high nibble and 2j+1 in its low one.
// Masking gives the 32 low nibbles (odd elements) and, after a 16-bit shift, the 32 high ones (even elements), each
// as bytes in element order per 128-bit lane. Two shuffles per nibble vector look up the table's low and high bytes;
// unpacking them gives four int16 vectors, per lane: odd 1..15 | 33..47, odd 17..31 | 49..63, even 0..14 | 32..46,
// even 16..30 | 48..62. The activations are stored in that order (xperm64), so each meets its input directly.
static void xperm64(const int16_t *in, int16_t *out) {
    for (int i = 0; i < 8; i++) {
        out[i] = in[2 * i + 1], out[8 + i] = in[33 + 2 * i];
        out[16 + i] = in[17 + 2 * i], out[24 + i] = in[49 + 2 * i];
        out[32 + i] = in[2 * i], out[40 + i] = in[32 + 2 * i];
        out[48 + i] = in[16 + 2 * i], out[56 + i] = in[48 + 2 * i];
    }
}

static inline __attribute__((always_inline)) void bnb4_i16_row(const uint8_t *row, const float *am,
                                                               const uint8_t *qam, const float *ncode,
                                                               const float *nabsmax, const float *offset,
                                                               int64_t ostride, int64_t b0,
                                                               const int DQ, int64_t K, const int16_t *xq,
                                                               const float *xs, int mb, __m256i tlo, __m256i thi,
                                                               float *out) {
    const int64_t nb = K / BNB_BLOCK;
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[4];
    for (int m = 0; m < 4; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const float s = DQ ? ncode[qam[b0 + b]] * nabsmax[(b0 + b) / BNB_NESTED] +
                                 offset[(b0 + b) / BNB_NESTED * ostride]
                           : am[b];
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + b * 32));
        const __m256i odd = _mm256_and_si256(raw, low4), even = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        const __m256i ol = _mm256_shuffle_epi8(tlo, odd), oh = _mm256_shuffle_epi8(thi, odd);
        const __m256i el = _mm256_shuffle_epi8(tlo, even), eh = _mm256_shuffle_epi8(thi, even);
        const __m256i w0 = _mm256_unpacklo_epi8(ol, oh), w1 = _mm256_unpackhi_epi8(ol, oh);
        const __m256i w2 = _mm256_unpacklo_epi8(el, eh), w3 = _mm256_unpackhi_epi8(el, eh);
        for (int m = 0; m < mb; m++) {
            const __m256i *xm = (const __m256i *)(xq + m * K + b * BNB_BLOCK);
            const __m256i d01 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xm)),
                                                 _mm256_madd_epi16(w1, _mm256_loadu_si256(xm + 1)));
            const __m256i d23 = _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_loadu_si256(xm + 2)),
                                                 _mm256_madd_epi16(w3, _mm256_loadu_si256(xm + 3)));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d01, d23)),
                                     _mm256_set1_ps(s * xs[m * nb + b]), acc[m]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = hsum8(acc[m]) / T16_ONE;
}
#endif

// work: lq_bnb4_i16_work(M, K) bytes. K % 64 == 0 (the caller checks).
int64_t lq_bnb4_i16_work(int64_t M, int64_t K) { return M * K * 4 + M * (K / BNB_BLOCK) * 4 + 64; }

void lq_bnb4_i16_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *absmax,
                      const uint8_t *qabsmax, const float *ncode, const float *nabsmax, const float *offset,
                      int64_t ostride, const float *lut, float *y, void *work, int nthreads) {
#if V == 8
    const int64_t nb = K / BNB_BLOCK;
    int16_t *xq = (int16_t *)work, *xr = xq + M * K;
    float *xs = (float *)(xr + M * K);
    quantize_x16(x, M, K, BNB_BLOCK, xq, xs, NULL);
    for (int64_t i = 0; i < M * K; i += 64) xperm64(xq + i, xr + i);
    int8_t tl[32], th[32];
    for (int c = 0; c < 16; c++) {
        const int16_t t = (int16_t)__builtin_nearbyintf(lut[c] * T16_ONE);
        tl[c] = tl[c + 16] = (int8_t)(t & 0xFF);
        th[c] = th[c + 16] = (int8_t)((t >> 8) & 0xFF);
    }
    const __m256i tlo = _mm256_loadu_si256((const __m256i *)tl), thi = _mm256_loadu_si256((const __m256i *)th);
#pragma omp parallel for schedule(static) num_threads(nthreads_for(N * K * M, nthreads))
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2);
        const float *am = qabsmax ? NULL : absmax + n * nb;
        float out[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
            const int16_t *xm = xr + m0 * K;
            const float *sm = xs + m0 * nb;
#define DQ_ROW(MB) bnb4_i16_row(row, am, qabsmax, ncode, nabsmax, offset, ostride, n * nb, 1, K, xm, sm, MB, tlo, thi, out)
#define ROW(MB) bnb4_i16_row(row, am, NULL, NULL, NULL, NULL, 0, n * nb, 0, K, xm, sm, MB, tlo, thi, out)
            if (qabsmax)
                BY_ROWS(mb, DQ_ROW);
            else
                BY_ROWS(mb, ROW);
#undef DQ_ROW
#undef ROW
            for (int m = 0; m < mb; m++) y[(m0 + m) * N + n] = out[m];
        }
    }
#else
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)absmax; (void)qabsmax; (void)ncode; (void)nabsmax;
    (void)offset; (void)ostride; (void)lut; (void)y; (void)work; (void)nthreads;
#endif
}

// ---- GPTQ 4-bit, groups in order (g_idx[k] = k / group_size) --------------------------------------------------
// qweight (K/8, N) int32: word (r, n) holds q[8r + j, n] in bits 4j..4j+3. (word >> 4j) & 0x000F000F puts q[8r+j]
// and q[8r+j+4] in the two int16 halves of each lane, so one VPMADDWD with the broadcast pair (x[8r+j], x[8r+j+4])
// adds both products for 8 output columns at once. x is quantized per block of B <= group_size inputs; the int32
// sums of a block are rescaled once, and each group ends with y += s * (acc - z * sum(x)).
// Threads split the output columns; each streams its columns of every row of qweight.
#define GPTQ_I16_MB 4

int64_t lq_gptq_i16_block(int64_t group_size) {  // the activation block: 128, or the group when smaller
    return group_size % 128 == 0 ? 128 : group_size;
}

int64_t lq_gptq_i16_work(int64_t M, int64_t K, int64_t N, int64_t B, int nthreads) {  // bytes
    const int64_t mb = M < GPTQ_I16_MB ? M : GPTQ_I16_MB;
    return M * K * 2 + M * (K / B) * 8 + (int64_t)nthreads * (mb * N * 12 + 64) + 64;
}

void lq_gptq_i16_gemm(const float *x, int64_t M, int64_t K, const int32_t *qweight, int64_t N,
                      const int32_t *qzeros, const uint16_t *scales, int64_t group_size, float *y, void *work,
                      int nthreads) {
#if V == 8
    const int64_t B = lq_gptq_i16_block(group_size), nbk = K / B, G = K / group_size, zcols = N / 8;
    int16_t *xq = (int16_t *)work;  // per 8 inputs: pairs (x0 x4) (x1 x5) (x2 x6) (x3 x7)
    float *xs = (float *)(xq + M * K);
    int32_t *xsum = (int32_t *)(xs + M * nbk);
    {
        int16_t *tmp = malloc(M * K * sizeof(int16_t));
        quantize_x16(x, M, K, B, tmp, xs, xsum);
        for (int64_t i = 0; i < M * K; i += 8)
            for (int j = 0; j < 4; j++) {
                xq[i + 2 * j] = tmp[i + j];
                xq[i + 2 * j + 1] = tmp[i + j + 4];
            }
        free(tmp);
    }
    char *scratch = (char *)(xsum + M * nbk);
    const int nt = nthreads_for(N * K * M, nthreads) < (int)(N / 8) ? nthreads_for(N * K * M, nthreads) : (int)(N / 8);
    // threads take contiguous runs of groups (each streams its own rows of qweight, all columns) and add their
    // partial results at the end; with fewer groups than threads, they split the columns instead
    const int by_groups = G >= nt;
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        const int64_t mbmax = M < GPTQ_I16_MB ? M : GPTQ_I16_MB;
        const int64_t s0 = N / 8 * tid / nth * 8, s1 = N / 8 * (tid + 1) / nth * 8;  // this thread's column share
        const int64_t c0 = by_groups ? 0 : s0, nc = by_groups ? N : s1 - s0;
        const int64_t g0 = by_groups ? G * tid / nth : 0, g1 = by_groups ? G * (tid + 1) / nth : G;
        int32_t *acc = (int32_t *)(scratch + tid * (mbmax * N * 12 + 64));  // mb x nc int32
        float *accf = (float *)(acc + mbmax * N);                             // mb x nc fp32
        float *part = accf + mbmax * N;                                       // mb x N: by_groups' partial y
        const __m256i m4 = _mm256_set1_epi32(0x000F000F);
        for (int64_t m0 = 0; m0 < M; m0 += GPTQ_I16_MB) {
            const int mb = (int)(M - m0 < GPTQ_I16_MB ? M - m0 : GPTQ_I16_MB);
            float *yt = by_groups ? part : y + m0 * N;  // row m of the target at yt + m * N + c0
            for (int m = 0; m < mb; m++)
                for (int64_t c = 0; c < nc; c++) yt[m * N + c0 + c] = 0.0f;
            for (int64_t g = g0; g < g1; g++) {
                memset(accf, 0, mb * nc * sizeof(float));
                for (int64_t bk = g * group_size / B; bk < (g + 1) * group_size / B; bk++) {
                    memset(acc, 0, mb * nc * sizeof(int32_t));
                    // two rows of qweight (16 inputs) per pass over the accumulators: half their loads and stores
                    for (int64_t r = bk * B / 8; r < (bk + 1) * B / 8; r += 2) {
                        const int two = r + 1 < (bk + 1) * B / 8;
                        const int32_t *w0 = qweight + r * N + c0, *w1 = qweight + (r + two) * N + c0;
                        __m256i xp[GPTQ_I16_MB][8];
                        for (int m = 0; m < mb; m++)
                            for (int j = 0; j < 8; j++) {
                                int32_t pair = 0;
                                if (j < 4 || two) memcpy(&pair, xq + (m0 + m) * K + (r + j / 4) * 8 + 2 * (j % 4), 4);
                                xp[m][j] = _mm256_set1_epi32(pair);
                            }
                        for (int64_t c = 0; c < nc; c += 8) {
                            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(w0 + c));
                            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(w1 + c));
                            __m256i q[8];
                            for (int j = 0; j < 4; j++) {
                                q[j] = _mm256_and_si256(_mm256_srli_epi32(a0, 4 * j), m4);
                                q[4 + j] = _mm256_and_si256(_mm256_srli_epi32(a1, 4 * j), m4);
                            }
                            for (int m = 0; m < mb; m++) {
                                __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(q[0], xp[m][0]), _mm256_madd_epi16(q[1], xp[m][1]));
                                __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(q[2], xp[m][2]), _mm256_madd_epi16(q[3], xp[m][3]));
                                __m256i s2 = _mm256_add_epi32(_mm256_madd_epi16(q[4], xp[m][4]), _mm256_madd_epi16(q[5], xp[m][5]));
                                __m256i s3 = _mm256_add_epi32(_mm256_madd_epi16(q[6], xp[m][6]), _mm256_madd_epi16(q[7], xp[m][7]));
                                __m256i *ap = (__m256i *)(acc + m * nc + c);
                                const __m256i t = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
                                _mm256_storeu_si256(ap, _mm256_add_epi32(_mm256_loadu_si256(ap), t));
                            }
                        }
                    }
                    for (int m = 0; m < mb; m++) {
                        const __m256 d = _mm256_set1_ps(xs[(m0 + m) * nbk + bk]);
                        for (int64_t c = 0; c < nc; c += 8) {
                            const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(acc + m * nc + c)));
                            _mm256_storeu_ps(accf + m * nc + c, _mm256_fmadd_ps(a, d, _mm256_loadu_ps(accf + m * nc + c)));
                        }
                    }
                }
                for (int m = 0; m < mb; m++) {
                    float xg = 0.0f;  // sum of the group's (quantized) inputs
                    for (int64_t bk = g * group_size / B; bk < (g + 1) * group_size / B; bk++)
                        xg += xs[(m0 + m) * nbk + bk] * (float)xsum[(m0 + m) * nbk + bk];
                    float *ym = yt + m * N + c0;
                    for (int64_t c = 0; c < nc; c += 8) {
                        const vf s = vhalf(scales + g * N + c0 + c), z = vzeros(qzeros + g * zcols, c0 + c, 4, 3);
                        const vf dv = vsub(_mm256_loadu_ps(accf + m * nc + c), vmul(z, vset1(xg)));
                        _mm256_storeu_ps(ym + c, _mm256_fmadd_ps(s, dv, _mm256_loadu_ps(ym + c)));
                    }
                }
            }
            if (by_groups) {
#pragma omp barrier
                for (int m = 0; m < mb; m++)
                    for (int64_t c = s0; c < s1; c += 8) {
                        __m256 a = _mm256_setzero_ps();
                        for (int64_t t = 0; t < nth; t++)
                            a = _mm256_add_ps(a, _mm256_loadu_ps((const float *)(scratch + t * (mbmax * N * 12 + 64)) + 2 * mbmax * N + m * N + c));
                        _mm256_storeu_ps(y + (m0 + m) * N + c, a);
                    }
#pragma omp barrier
            }
        }
    }
#else
    (void)x; (void)M; (void)K; (void)qweight; (void)N; (void)qzeros; (void)scales; (void)group_size; (void)y;
    (void)work; (void)nthreads;
#endif
}

// ---- bf16 weights, fp32 activations (any build) ---------------------------------------------------------------
// y[M, N] = x[M, K] @ W^T with W (N, K) bf16: bf16 -> fp32 is a 16-bit shift, so the products are the fp32 ones of
// the stored weights; sums in fp32. K % V == 0 (the caller checks). 4 output rows at a time share each x load.
static inline __attribute__((always_inline)) void bf16_rows(const uint16_t *w, int64_t K, const float *x, int mb,
                                                            float *out /* 4 rows x mb */) {
    vf acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < 4; m++) acc[r][m] = vzero();
    for (int64_t k = 0; k < K; k += V) {
        vf wv[4];
        for (int r = 0; r < 4; r++) wv[r] = vbf16(w + r * K + k);
        for (int m = 0; m < mb; m++) {
            const vf xv = vload(x + m * K + k);
            for (int r = 0; r < 4; r++) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < mb; m++) out[r * 4 + m] = vsum(acc[r][m]);
}

void lq_bf16_gemm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int nthreads) {
    const int64_t N4 = N / 4 * 4;
#pragma omp parallel for schedule(static) num_threads(nthreads_for(N * K * M, nthreads))
    for (int64_t n = 0; n < N4; n += 4) {
        float out[16];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
#define RUN(MB) bf16_rows(w + n * K, K, x + m0 * K, MB, out)
            BY_ROWS(mb, RUN);
#undef RUN
            for (int r = 0; r < 4; r++)
                for (int m = 0; m < mb; m++) y[(m0 + m) * N + n + r] = out[r * 4 + m];
        }
    }
    for (int64_t n = N4; n < N; n++)  // the last N % 4 rows
        for (int64_t m = 0; m < M; m++) {
            vf a = vzero();
            for (int64_t k = 0; k < K; k += V) a = vfma(vbf16(w + n * K + k), vload(x + m * K + k), a);
            y[m * N + n] = vsum(a);
        }
}
