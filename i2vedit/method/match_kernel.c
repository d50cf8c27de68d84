/* Spatial attention matching of one self-attention layer on x86-64 CPUs with AVX2 and FMA (method.md §4).
 *
 * The same maths as attention.spatial_match, fused so that no map leaves the cache: for each tile of
 * RT query rows, each head's two score rows (edit, source) are computed against keys packed in blocks
 * of 8, turned into probabilities in place, compared (D = 1 − mean over heads of Σ min(P^e, P^s)) and
 * applied to the values (P^e·V and P^s·V); the output is (1 − M)·P^s·V + M·P^e·V with M the blend
 * weight. Built and loaded by native.py; each call works on a range of tiles, so Python threads can
 * share a layer (ctypes releases the GIL). Plain IEEE arithmetic, a fixed order: the same inputs give
 * the same bits whatever the thread count.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define RG 4    /* query rows held in registers at once */
#define RT 8    /* query rows per tile: the groups of a tile share each key chunk */
#define JC 256  /* keys per chunk: one chunk of packed keys stays in L1 */
#define PAD 16  /* score rows are N + PAD floats apart, so rows never alias in the cache */

static inline __m256 exp8(__m256 x)
{
    /* Cephes' single-precision exp: x = n·ln2 + r, e^r by a degree-6 polynomial, 2^n in the exponent */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* S[r][j] = qa[r]·k_j for r < RT, j < N; kp: keys packed (N/8, d, 8); S rows ld floats apart */
static void scores(const float *qa, const float *kp, float *S, long N, long ld, long d)
{
    for (long j0 = 0; j0 < N; j0 += JC) {
        long j1 = j0 + JC < N ? j0 + JC : N;
        for (long g = 0; g < RT; g += RG) {
            const float *q = qa + g * d;
            float *Sg = S + g * ld;
            for (long j = j0; j < j1; j += 8) {
                const float *kb = kp + j * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (long k = 0; k < d; ++k) {
                    __m256 kv = _mm256_loadu_ps(kb + k * 8);
                    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + k), kv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + d + k), kv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + 2 * d + k), kv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + 3 * d + k), kv, a3);
                }
                _mm256_storeu_ps(Sg + j, a0);
                _mm256_storeu_ps(Sg + ld + j, a1);
                _mm256_storeu_ps(Sg + 2 * ld + j, a2);
                _mm256_storeu_ps(Sg + 3 * ld + j, a3);
            }
        }
    }
}

/* S := exp(S − max S) in place; returns 1 / Σ exp */
static float exp_row(float *S, long N)
{
    __m256 m = _mm256_loadu_ps(S);
    for (long j = 8; j < N; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(S + j));
    __m256 mx = _mm256_set1_ps(hmax(m)), z = _mm256_setzero_ps();
    for (long j = 0; j < N; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(S + j), mx));
        _mm256_storeu_ps(S + j, e);
        z = _mm256_add_ps(z, e);
    }
    return 1.0f / hsum(z);
}

/* o[r] = a[r]·(P[r] @ v) for r < RG; v (N, d); P rows ld floats apart, o rows d floats apart */
static void apply(const float *P, long N, long ld, const float *v, long d, const float *a, float *o)
{
    for (long c = 0; c < d; c += 16) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
        __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
        for (long j = 0; j < N; ++j) {
            __m256 x0 = _mm256_loadu_ps(v + j * d + c), x1 = _mm256_loadu_ps(v + j * d + c + 8);
            __m256 p0 = _mm256_broadcast_ss(P + j), p1 = _mm256_broadcast_ss(P + ld + j);
            __m256 p2 = _mm256_broadcast_ss(P + 2 * ld + j), p3 = _mm256_broadcast_ss(P + 3 * ld + j);
            a00 = _mm256_fmadd_ps(p0, x0, a00);
            a01 = _mm256_fmadd_ps(p0, x1, a01);
            a10 = _mm256_fmadd_ps(p1, x0, a10);
            a11 = _mm256_fmadd_ps(p1, x1, a11);
            a20 = _mm256_fmadd_ps(p2, x0, a20);
            a21 = _mm256_fmadd_ps(p2, x1, a21);
            a30 = _mm256_fmadd_ps(p3, x0, a30);
            a31 = _mm256_fmadd_ps(p3, x1, a31);
        }
        __m256 s0 = _mm256_set1_ps(a[0]), s1 = _mm256_set1_ps(a[1]);
        __m256 s2 = _mm256_set1_ps(a[2]), s3 = _mm256_set1_ps(a[3]);
        _mm256_storeu_ps(o + c, _mm256_mul_ps(s0, a00));
        _mm256_storeu_ps(o + c + 8, _mm256_mul_ps(s0, a01));
        _mm256_storeu_ps(o + d + c, _mm256_mul_ps(s1, a10));
        _mm256_storeu_ps(o + d + c + 8, _mm256_mul_ps(s1, a11));
        _mm256_storeu_ps(o + 2 * d + c, _mm256_mul_ps(s2, a20));
        _mm256_storeu_ps(o + 2 * d + c + 8, _mm256_mul_ps(s2, a21));
        _mm256_storeu_ps(o + 3 * d + c, _mm256_mul_ps(s3, a30));
        _mm256_storeu_ps(o + 3 * d + c + 8, _mm256_mul_ps(s3, a31));
    }
}

/* Query rows per tile, so that the caller counts tiles as this kernel does. */
long i2v_match_tile_rows(void) { return RT; }

/* Tiles [t0, t1) of a layer (tile t: frame t / tiles, query rows RT·(t % tiles) on). Inputs fp32, contiguous:
 * q (F, H, N, d); kp keys packed (F, H, N/8, d, 8); v (F, H, N, d); tau (F). Outputs: out (F, H, N, d),
 * diff and weight (F, N). Needs N % 8 == 0 and d % 16 == 0. Returns 0, or 1 when out of memory. */
int i2v_match_tiles(const float *qe, const float *kpe, const float *ve, const float *qs, const float *kps,
                    const float *tau, float *out, float *diff, float *weight,
                    long H, long N, long d, float scale, long t0, long t1)
{
    long tiles = (N + RT - 1) / RT, ld = N + PAD;
    float *se = calloc(2 * RT * ld, sizeof(float));
    float *qa = calloc(RT * d, sizeof(float));
    float *oe = calloc(2 * H * RT * d, sizeof(float));
    if (!se || !qa || !oe) {
        free(se), free(qa), free(oe);
        return 1;
    }
    float *ss = se + RT * ld, *os = oe + H * RT * d;
    float ze[RT], zs[RT], mins[RT];
    for (long t = t0; t < t1; ++t) {
        long f = t / tiles, i0 = (t % tiles) * RT, rows = N - i0 < RT ? N - i0 : RT;
        for (long r = 0; r < RT; ++r) mins[r] = 0.0f;
        for (long h = 0; h < H; ++h) {
            long fh = f * H + h;
            for (int side = 0; side < 2; ++side) {
                const float *q = (side ? qs : qe) + (fh * N + i0) * d;
                float *S = side ? ss : se, *z = side ? zs : ze;
                for (long x = 0; x < RT * d; ++x) qa[x] = x < rows * d ? q[x] * scale : 0.0f;
                scores(qa, (side ? kps : kpe) + fh * N * d, S, N, ld, d);
                for (long r = 0; r < RT; ++r) z[r] = exp_row(S + r * ld, N);
            }
            for (long r = 0; r < rows; ++r) {
                const float *E = se + r * ld, *Sx = ss + r * ld;
                __m256 ae = _mm256_set1_ps(ze[r]), as = _mm256_set1_ps(zs[r]), mn = _mm256_setzero_ps();
                for (long j = 0; j < N; j += 8)
                    mn = _mm256_add_ps(mn, _mm256_min_ps(_mm256_mul_ps(ae, _mm256_loadu_ps(E + j)),
                                                         _mm256_mul_ps(as, _mm256_loadu_ps(Sx + j))));
                mins[r] += hsum(mn);
            }
            const float *v = ve + fh * N * d;
            for (long g = 0; g < RT; g += RG) {
                apply(se + g * ld, N, ld, v, d, ze + g, oe + (h * RT + g) * d);
                apply(ss + g * ld, N, ld, v, d, zs + g, os + (h * RT + g) * d);
            }
        }
        for (long r = 0; r < rows; ++r) {
            float D = 1.0f - mins[r] / (float)H;
            D = D < 0.0f ? 0.0f : (D > 1.0f ? 1.0f : D);
            float w = D >= tau[f] ? 1.0f : D;
            diff[f * N + i0 + r] = D;
            weight[f * N + i0 + r] = w;
            for (long h = 0; h < H; ++h) {
                float *o = out + ((f * H + h) * N + i0 + r) * d;
                const float *pe = oe + (h * RT + r) * d, *ps = os + (h * RT + r) * d;
                for (long c = 0; c < d; ++c) o[c] = ps[c] + w * (pe[c] - ps[c]);
            }
        }
    }
    free(se), free(qa), free(oe);
    return 0;
}
