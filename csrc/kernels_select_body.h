/* kernels_select_body.h — selection kernels: top_members' sampling, admission
 * and offers, clustered top-k offers, max-pooling scans; the clustering's row argmax and
 * LSH bits (its column argmax and k-means++ potentials: kernels_kmeans_body.h).
 * Included by kernels_body.h (once per type, with its macros). */

/* ------------------------------------------------------------------ top_members */
/* Bit l set iff lane l of the comparison mask m is true. */
static inline unsigned FN(mask_bits)(uvec m)
{
#if VEC_BYTES == 64 && RA_IS_F32
    return (unsigned)_mm512_movepi32_mask((__m512i)m);
#elif VEC_BYTES == 64
    return (unsigned)_mm512_movepi64_mask((__m512i)m);
#elif VEC_BYTES == 32 && RA_IS_F32
    return (unsigned)_mm256_movemask_ps((__m256)m);
#elif VEC_BYTES == 32
    return (unsigned)_mm256_movemask_pd((__m256d)m);
#elif defined(RA_X86) && RA_IS_F32
    return (unsigned)_mm_movemask_ps((__m128)m);
#elif defined(RA_X86)
    return (unsigned)_mm_movemask_pd((__m128d)m);
#else
    /* portable (NEON and others): the sign bit of each lane, weighted by its lane bit */
    unsigned bits = 0;
    for (int l = 0; l < VL; l++) bits |= (unsigned)(m[l] >> (8 * sizeof(UT) - 1)) << l;
    return bits;
#endif
}

static void FN(top_sample)(int rows, int cb, const T *s, ptrdiff_t ld, int m, T *top,
                           ptrdiff_t ldt, void *tpos_)
{
    UT *tpos = (UT *)tpos_;
    const int cbv = cb / VL * VL;
    const vec ninf = FN(vsplat)(-(T)INFINITY);
    T *last = top + (m - 1) * ldt;
    for (int r = 0; r < rows; r++) {               /* row by row: the rows are strided */
        const T *p = s + r * ld;
        if (r + 4 < rows)
            for (int j0 = 0; j0 < cb; j0 += 64 / (int)sizeof(T))
                __builtin_prefetch(p + 4 * ld + j0);
        for (int j0 = 0; j0 < cbv; j0 += VL) {
            vec v = FN(vload)(p + j0);
            v = FN(vsel)((uvec)(v == v), v, ninf);
            if (!FN(mask_bits)((uvec)(v > FN(vload)(last + j0)))) continue;   /* most rows */
            /* insertion, one lane each: v goes in front of the first entry it strictly
               exceeds and the entries from there on shift down one slot (compare with v
               itself, never with a displaced entry); an equal value stays behind the
               earlier rows, so the list is the first m in (value ↓, position ↑) */
            vec carry = v;
            if (tpos) {
                uvec q = (uvec){0} + (UT)r;
                for (int k = 0; k < m; k++) {
                    const vec t = FN(vload)(top + k * ldt + j0);
                    uvec tq;
                    memcpy(&tq, tpos + k * ldt + j0, sizeof(tq));
                    const uvec gt = (uvec)(v > t);
                    FN(vstore)(top + k * ldt + j0, FN(vsel)(gt, carry, t));
                    const uvec nq = (q & gt) | (tq & ~gt);
                    memcpy(tpos + k * ldt + j0, &nq, sizeof(nq));
                    carry = FN(vsel)(gt, t, carry);
                    q = (tq & gt) | (q & ~gt);
                }
            } else {
                for (int k = 0; k < m; k++) {
                    const vec t = FN(vload)(top + k * ldt + j0);
                    const uvec gt = (uvec)(v > t);
                    FN(vstore)(top + k * ldt + j0, FN(vsel)(gt, carry, t));
                    carry = FN(vsel)(gt, t, carry);
                }
            }
        }
        for (int j = cbv; j < cb; j++) {
            T v = p[j];
            if (v != v) v = -(T)INFINITY;
            if (!(v > last[j])) continue;
            UT q = (UT)r;
            T carry = v;
            for (int k = 0; k < m; k++) {
                T *tk = top + k * ldt + j;
                if (v > *tk) {                 /* from here on: shift down one slot */
                    const T x = *tk; *tk = carry; carry = x;
                    if (tpos) { const UT y = tpos[k * ldt + j]; tpos[k * ldt + j] = q; q = y; }
                }
            }
        }
    }
}

/* Bit l set iff a[l] OP b[l] (false with a NaN; quiet where the ISA has it). */
#if VEC_BYTES == 64 && RA_IS_F32
#define RA_CMP_BITS(a, b, PRED, OP) (unsigned)_mm512_cmp_ps_mask((__m512)(a), (__m512)(b), PRED)
#elif VEC_BYTES == 64
#define RA_CMP_BITS(a, b, PRED, OP) (unsigned)_mm512_cmp_pd_mask((__m512d)(a), (__m512d)(b), PRED)
#elif VEC_BYTES == 32 && RA_IS_F32
#define RA_CMP_BITS(a, b, PRED, OP)                                                         \
    (unsigned)_mm256_movemask_ps(_mm256_cmp_ps((__m256)(a), (__m256)(b), PRED))
#elif VEC_BYTES == 32
#define RA_CMP_BITS(a, b, PRED, OP)                                                         \
    (unsigned)_mm256_movemask_pd(_mm256_cmp_pd((__m256d)(a), (__m256d)(b), PRED))
#else
#define RA_CMP_BITS(a, b, PRED, OP) FN(mask_bits)((uvec)((a) OP (b)))
#endif
static inline unsigned FN(ge_bits)(vec a, vec b) { return RA_CMP_BITS(a, b, _CMP_GE_OQ, >=); }
static inline unsigned FN(gt_bits)(vec a, vec b) { return RA_CMP_BITS(a, b, _CMP_GT_OQ, >); }
static inline unsigned FN(eq_bits)(vec a, vec b) { return RA_CMP_BITS(a, b, _CMP_EQ_OQ, ==); }
#undef RA_CMP_BITS

/* S (rows, c) -> lab (rows): the first column holding the row's largest non-NaN score
 * (−1 when every score is NaN), best (rows): that score (NaN for −1).  Two running
 * maxima per row, then one vector compare per block of columns, last block first, finds
 * the first column equal to the maximum.  NaN lanes are replaced before any ordered
 * compare, so none raises the invalid flag. */
static void FN(argmax_rows)(int rows, int c, const T *S, ptrdiff_t lds, int64_t *lab, T *best)
{
    const int cv = c / VL * VL;
    for (int i = 0; i < rows; i++) {
        const T *s = S + i * lds;
        vec m0 = FN(vsplat)(-INFINITY), m1 = m0;
        int j = 0;
        for (; j + 2 * VL <= cv; j += 2 * VL) {
            vec x0 = FN(vload)(s + j), x1 = FN(vload)(s + j + VL);
            x0 = FN(vsel)((uvec)(x0 == x0), x0, m0);       /* NaN lanes never compete */
            x1 = FN(vsel)((uvec)(x1 == x1), x1, m1);
            m0 = FN(vsel)((uvec)(x0 > m0), x0, m0);
            m1 = FN(vsel)((uvec)(x1 > m1), x1, m1);
        }
        for (; j < cv; j += VL) {
            vec x = FN(vload)(s + j);
            x = FN(vsel)((uvec)(x == x), x, m0);
            m0 = FN(vsel)((uvec)(x > m0), x, m0);
        }
        m0 = FN(vsel)((uvec)(m1 > m0), m1, m0);
        T m = FN(hmax)(m0);
        for (j = cv; j < c; j++) m = (s[j] == s[j] && s[j] > m) ? s[j] : m;
        int first = c;                 /* no early exit: its branch would mispredict */
        const vec mv = FN(vsplat)(m);
        for (j = cv - VL; j >= 0; j -= VL) {
            const unsigned hit = FN(eq_bits)(FN(vload)(s + j), mv);
            first = hit ? j + __builtin_ctz(hit) : first;
        }
        for (j = cv; first == c && j < c; j++)
            if (s[j] == m) first = j;
        const int64_t l = first < c ? first : -1;
        lab[i] = l;
        best[i] = l >= 0 ? m : (T)NAN;
    }
}

static void FN(threshold_bits)(int rows, int bits, const T *S, ptrdiff_t lds, const T *thr,
                               int64_t *codes)
{
    const int bv = bits / VL * VL;
    for (int r = 0; r < rows; r++) {
        const T *s = S + r * lds;
        uint64_t code = 0;
        for (int j = 0; j < bv; j += VL) {
            /* NaN lanes out of the way first (== is quiet everywhere, > is not on SSE2) */
            vec y = FN(vload)(s + j), t = FN(vload)(thr + j);
            y = FN(vsel)((uvec)(y == y), y, FN(vsplat)(-(T)INFINITY));
            t = FN(vsel)((uvec)(t == t), t, FN(vsplat)((T)INFINITY));
            code |= (uint64_t)FN(gt_bits)(y, t) << j;
        }
        for (int j = bv; j < bits; j++) code |= (uint64_t)__builtin_isgreater(s[j], thr[j]) << j;
        codes[r] = (int64_t)code;
    }
}

/* Columns per block of top_admit: the lists' next free slots of one block stay in a small
 * array on the stack whatever the number of columns. */
#define RA_ADMIT_COLS 256

static void FN(top_admit)(int rows, int cb, const T *s, ptrdiff_t ld, int row0, T *thr,
                          int cap, int *cnt, int32_t *pos, T *val)
{
    const ptrdiff_t st = (ptrdiff_t)cap + RA_TOP_SLACK;
    ptrdiff_t off[RA_ADMIT_COLS + 1];               /* next free slot of each list */
    for (int c0 = 0; c0 < cb; c0 += RA_ADMIT_COLS) {  /* each column on its own: any order */
        const int c1 = cb - c0 < RA_ADMIT_COLS ? cb : c0 + RA_ADMIT_COLS;
        const int cv = c0 + (c1 - c0) / VL * VL;    /* vectors up to here (c0 % VL == 0) */
        /* list c1 takes a vector's write without a hit, past its count: the scratch list
           cb, or the next block's first list, which overwrites it with its own entries */
        for (int j = c0; j <= c1; j++) off[j - c0] = j * st + cnt[j];
        for (int b0 = 0; b0 < rows; b0 += RA_TOP_SLACK - 1) {
            const int b1 = rows - b0 < RA_TOP_SLACK - 1 ? rows : b0 + RA_TOP_SLACK - 1;
            for (int r = b0; r < b1; r++) {
                const T *p = s + r * ld;
                if (r + 8 < rows)                    /* rows are strided: help the prefetcher */
                    for (int j0 = c0; j0 < c1; j0 += 64 / (int)sizeof(T))
                        __builtin_prefetch(p + 8 * ld + j0);
                const int32_t at = row0 + r;
                for (int j0 = c0; j0 < cv; j0 += VL) {
                    unsigned bits = FN(ge_bits)(FN(vload)(p + j0), FN(vload)(thr + j0));
                    /* the first hit without a branch (most chunks have 0 or 1): with none,
                       the write goes to the next free slot of list j0 + VL (<= c1), uncounted */
                    const int l = __builtin_ctz(bits | (1u << VL));
                    const ptrdiff_t o = off[j0 - c0 + l];
                    pos[o] = at;
                    val[o] = p[j0 + (l & (VL - 1))];
                    off[j0 - c0 + l] = o + (bits != 0);
                    bits &= bits - 1;
                    while (bits) {
                        const int jj = j0 + __builtin_ctz(bits);
                        bits &= bits - 1;
                        const ptrdiff_t oo = off[jj - c0]++;
                        pos[oo] = at;
                        val[oo] = p[jj];
                    }
                }
                for (int j = cv; j < c1; j++)
                    if (p[j] >= thr[j]) {
                        const ptrdiff_t o = off[j - c0]++;
                        pos[o] = at;
                        val[o] = p[j];
                    }
            }
            /* a block of rows adds at most RA_TOP_SLACK - 1 entries per list: full lists
               stop here */
            for (int j = c0; j < c1; j++)
                if (off[j - c0] - j * st >= cap) thr[j] = (T)NAN;
        }
        for (int j = c0; j < c1; j++) cnt[j] = (int)(off[j - c0] - j * st);
    }
}

/* ------------------------------------------------------------------ clustered top-k */

/* Clustered top-k.  Row r's list holds its best entries so far in lv[0 .. n), positions
 * in lj (integers of T's width), padded to whole vectors.  The entries of a row that pass
 * the filter (at least the floor, above a full list's worst) are collected in offer order,
 * up to RA_OFFER_BATCH of them, and merged into the list at once; the filter tightens
 * after each merge.  Collecting any superset, among the offered (kpos >= 0) entries, of
 * those that can enter leaves the same list: an entry that cannot is ranked out of it. */
#define RA_OFFER_BATCH (8 * VL)

/* Lanes [0, live) of a vector's bit mask (live may exceed VL). */
static inline unsigned FN(live_bits)(int live) { return live >= VL ? ~0u : (1u << live) - 1; }

/* One offer, in sequence (the path for NaN): x goes after the list's entries >= it, a
 * NaN after all; the list keeps its best cap.  Returns the new size. */
static int FN(offer_one)(T *lv, UT *lp, int n, int cap, T x, UT pos)
{
    int at = n;
    if (x == x) {       /* vector compares: quiet on x86 (a scalar loop vectorises into
                           signalling ones); the list is read in whole vectors */
        at = 0;
        for (int t0 = 0; t0 < n; t0 += VL)
            at += __builtin_popcount(FN(ge_bits)(FN(vload)(lv + t0), FN(vsplat)(x)) &
                                     FN(live_bits)(n - t0));
    }
    if (at >= cap) return n;
    const int moved = (n < cap ? n : cap - 1) - at;      /* entries that shift one down */
    memmove(lv + at + 1, lv + at, sizeof(T) * (size_t)moved);
    memmove(lp + at + 1, lp + at, sizeof(UT) * (size_t)moved);
    lv[at] = x;
    lp[at] = pos;
    return n < cap ? n + 1 : n;
}

/* A batch of m offers (bv, bp: offer order, no NaN; lanes up to whole vectors readable)
 * merged into a list of n entries (best first, no NaN): every entry's rank counts what
 * precedes it — larger values, and equal ones offered earlier (the list's before the
 * batch's) — and the ranks below cap are written in place: a list entry only moves to a
 * higher index, past the batch values above it, so going from the last entry to the
 * first no slot is overwritten before it is read; the batch's entries go last, into the
 * slots no kept list entry takes.  Returns the new size. */
static int FN(offer_merge)(T *lv, UT *lp, int n, const T *bv, const UT *bp, int m, int cap)
{
    int rank[RA_OFFER_BATCH];
    for (int i = 0; i < m; i++) {
        const vec x = FN(vsplat)(bv[i]);
        int r = 0;
        for (int t0 = 0; t0 < n; t0 += VL)
            r += __builtin_popcount(FN(ge_bits)(FN(vload)(lv + t0), x) & FN(live_bits)(n - t0));
        for (int t0 = 0; t0 < m; t0 += VL) {
            const vec y = FN(vload)(bv + t0);
            const unsigned before = FN(live_bits)(i - t0 > 0 ? i - t0 : 0);
            const unsigned hit = (FN(ge_bits)(y, x) & before) | (FN(gt_bits)(y, x) & ~before);
            r += __builtin_popcount(hit & FN(live_bits)(m - t0));
        }
        rank[i] = r;
    }
    for (int t = n - 1; t >= 0; t--) {
        const vec x = FN(vsplat)(lv[t]);
        int r = t;
        for (int t0 = 0; t0 < m; t0 += VL)
            r += __builtin_popcount(FN(gt_bits)(FN(vload)(bv + t0), x) & FN(live_bits)(m - t0));
        if (r < cap) {
            lv[r] = lv[t];
            lp[r] = lp[t];
        }
    }
    for (int i = 0; i < m; i++)
        if (rank[i] < cap) {
            lv[rank[i]] = bv[i];
            lp[rank[i]] = bp[i];
        }
    return n + m < cap ? n + m : cap;
}

/* Columns per block of top_offer: which of a block's entries are offered (kpos >= 0) and
 * their positions as list integers are worked out once for all its rows. */
#define RA_OFFER_BLOCK 2048

/* The lanes `offer` of x (positions pos; VL entries of each readable) appended to bv,
 * bp in lane order (room for VL more).  Returns how many. */
static inline int FN(offer_collect)(const T *x, const UT *pos, unsigned offer, T *bv, UT *bp)
{
#if defined(RA_X86) && VEC_BYTES == 64      /* branch-free: compressed in registers */
#if RA_IS_F32
    _mm512_storeu_ps(bv, _mm512_maskz_compress_ps((__mmask16)offer, _mm512_loadu_ps(x)));
    _mm512_storeu_si512(bp, _mm512_maskz_compress_epi32((__mmask16)offer, _mm512_loadu_si512(pos)));
#else
    _mm512_storeu_pd(bv, _mm512_maskz_compress_pd((__mmask8)offer, _mm512_loadu_pd(x)));
    _mm512_storeu_si512(bp, _mm512_maskz_compress_epi64((__mmask8)offer, _mm512_loadu_si512(pos)));
#endif
    return __builtin_popcount(offer);
#else
    int m = 0;
    for (; offer; offer &= offer - 1, m++) {
        const int l = __builtin_ctz(offer);
        bv[m] = x[l];
        bp[m] = pos[l];
    }
    return m;
#endif
}

/* 1 if one of bv[0 .. m) is NaN (whole vectors readable; quiet compares). */
static inline int FN(batch_has_nan)(const T *bv, int m)
{
    const unsigned lanes = FN(live_bits)(VL - 1) << 1 | 1u;   /* the VL bits of a vector */
    unsigned nan = 0;
    for (int t0 = 0; t0 < m; t0 += VL) {
        const vec y = FN(vload)(bv + t0);
        nan |= ~FN(eq_bits)(y, y) & FN(live_bits)(m - t0) & lanes;
    }
    return nan != 0;
}

/* A bound at or below the cap-th best value of x (cols, NaN as -inf): the cap-th best
 * of each lane's depth + 1 largest values, distinct entries of x (the union's cap-th
 * best is at most the whole row's).  -inf when there are too few columns. */
static T FN(offer_floor)(const T *x, int cols, int cap, int depth)
{
    const vec ninf = FN(vsplat)(-(T)INFINITY);
    vec top[RA_OFFER_DEPTH + 1];
    const int levels = depth + 1;
    for (int t = 0; t < levels; t++) top[t] = ninf;
    for (int j0 = 0; j0 + VL <= cols; j0 += VL) {
        vec y = FN(vload)(x + j0);
        y = FN(vsel)((uvec)(y == y), y, ninf);            /* quiet: no NaN compared below */
        for (int t = 0; t < levels; t++) {                /* y into the lane's ranks */
            const vec was = top[t];
            top[t] = FN(vmax_skip_nan)(y, was);
            y = FN(vmin_skip_nan)(was, y);
        }
    }
    /* the largest of the union's values with at least cap of them >= it */
    T floor = -(T)INFINITY;
    for (int t = 0; t < levels; t++)
        for (int l = 0; l < VL; l++) {
            const T v = top[t][l];
            if (!(v > floor)) continue;
            const vec vv = FN(vsplat)(v);
            int at_least = 0;
            for (int u = 0; u < levels; u++) at_least += __builtin_popcount(FN(ge_bits)(top[u], vv));
            if (at_least >= cap) floor = v;
        }
    return floor;
}

/* One row's block of top_offer: x (cols) with the block's live lanes (bit l of
 * live[j0 / VL]: entry j0 + l is offered) and positions pos; the list lv, lp of *size
 * entries. */
static void FN(offer_row)(const T *x, int cols, const unsigned *live, const UT *pos, int cap,
                          T *lv, UT *lp, int *size)
{
    const int depth = (cap + VL - 1) / VL;    /* per-lane ranks that make up cap values */
    T bv[RA_OFFER_BATCH];
    UT bp[RA_OFFER_BATCH];
    int n = *size;
    /* the floor only while the list is not full (a full list's worst entry filters about
       as well, for free) and over enough columns to repay its selection; -inf (too few,
       or -inf values) filters nothing */
    const T floor = depth <= RA_OFFER_DEPTH && cols / VL >= 4 * (depth + 1) && n < cap
                    ? FN(offer_floor)(x, cols, cap, depth) : -(T)INFINITY;
    T worst = n == cap ? lv[cap - 1] : (T)NAN;
    int m = 0;
    for (int j0 = 0; j0 < cols; j0 += VL) {
        const int lanes = cols - j0 < VL ? cols - j0 : VL;
        /* a short last vector goes through a padded copy (its live bits stop at cols) */
        T tail[VL];
        const T *xv = x + j0;
        if (lanes < VL) {
            for (int l = 0; l < VL; l++) tail[l] = l < lanes ? x[j0 + l] : 0;
            xv = tail;
        }
        const vec y = FN(vload)(xv);
        unsigned offer = live[j0 / VL];
        if (floor > -(T)INFINITY) offer &= FN(ge_bits)(y, FN(vsplat)(floor));
        /* full, a number last: only larger values */
        if (worst == worst) offer &= FN(gt_bits)(y, FN(vsplat)(worst));
        m += FN(offer_collect)(xv, pos + j0, offer, bv + m, bp + m);
        /* merge when the batch is full, at the end, or as soon as the list could fill
           (its worst entry then filters the rest more tightly than the floor) */
        if (m == 0 || (m <= RA_OFFER_BATCH - VL && j0 + VL < cols && (n == cap || n + m < cap)))
            continue;
        for (int i = m; i % VL; i++) bv[i] = 0;          /* defined padding lanes */
        if (FN(batch_has_nan)(bv, m) || (n > 0 && lv[n - 1] != lv[n - 1])) {
            for (int i = 0; i < m; i++) n = FN(offer_one)(lv, lp, n, cap, bv[i], bp[i]);
        } else {
            n = FN(offer_merge)(lv, lp, n, bv, bp, m, cap);
        }
        m = 0;
        worst = n == cap ? lv[cap - 1] : (T)NAN;
    }
    *size = n;
}

static void FN(top_offer)(int rows, int cols, const T *s, ptrdiff_t ld, const int64_t *kpos,
                          int cap, T *lv, void *lj, ptrdiff_t ldl, int *size, ptrdiff_t lds)
{
    unsigned live[RA_OFFER_BLOCK / VL];
    UT pos[RA_OFFER_BLOCK];
    for (int c0 = 0; c0 < cols; c0 += RA_OFFER_BLOCK) {
        const int cb = cols - c0 < RA_OFFER_BLOCK ? cols - c0 : RA_OFFER_BLOCK;
        for (int j0 = 0; j0 < cb; j0 += VL) {
            unsigned bits = 0;
            for (int l = 0; l < VL; l++) {          /* whole vectors, 0 past the block */
                const int64_t kp = j0 + l < cb ? kpos[c0 + j0 + l] : -1;
                bits |= (unsigned)(kp >= 0) << l;
                pos[j0 + l] = (UT)kp;
            }
            live[j0 / VL] = bits;
        }
        for (int r = 0; r < rows; r++)
            FN(offer_row)(s + r * ld + c0, cb, live, pos, cap, lv + r * ldl,
                          (UT *)lj + r * ldl, size + r * lds);
    }
}

/* ------------------------------------------------------------------ max-pooling */
/* Columns in register blocks of VL: the running maximum and its row stay in registers
 * over the whole scan; the row indices ride in 32-bit lanes beside the values.  A NaN is
 * the maximum, as np.max has it, from the lowest NaN row (np.argmax's): an upward
 * (strict) scan keeps the first NaN it meets, a downward one takes every NaN. */
#if RA_IS_F32
typedef int32_t FN(svec) __attribute__((vector_size(VEC_BYTES)));
#else
typedef int64_t FN(svec) __attribute__((vector_size(VEC_BYTES)));
#endif
typedef int32_t FN(ivec) __attribute__((vector_size(VL * 4), aligned(4)));

static void FN(pool_scan)(const T *x, ptrdiff_t ld, int from, int to, int step, int d, T *best,
                          int32_t *barg, int strict)
{
    const int dv = d / VL * VL;
    for (int c0 = 0; c0 < dv; c0 += VL) {
        vec b;
        FN(ivec) a;
        memcpy(&b, best + c0, sizeof b);
        memcpy(&a, barg + c0, sizeof a);
        for (int j = from; j != to; j += step) {
            const vec xv = FN(vload)(x + j * ld + c0);
            const uvec x_nan = (uvec)(xv != xv), b_nan = (uvec)(b != b);
            const uvec up = strict ? (uvec)(xv > b) | (x_nan & ~b_nan)
                                   : (uvec)(xv >= b) | x_nan;
            const FN(ivec) upi = __builtin_convertvector((FN(svec))up, FN(ivec));
            b = FN(vsel)(up, xv, b);
            a = (upi & j) | (~upi & a);
        }
        memcpy(best + c0, &b, sizeof b);
        memcpy(barg + c0, &a, sizeof a);
    }
    for (int c = dv; c < d; c++)
        for (int j = from; j != to; j += step) {
            const T xj = x[j * ld + c];
            const int up = strict ? xj > best[c] || (xj != xj && best[c] == best[c])
                                  : xj >= best[c] || xj != xj;
            best[c] = up ? xj : best[c];
            barg[c] = up ? j : barg[c];
        }
}

