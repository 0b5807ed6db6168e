/* kernel_check_body.h — kernel_check.c's checks for one element type.  Included with
 * T (float / double) and SUF (32 / 64) defined; undefines both at the end. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define KIND (SUF == 32 ? 'f' : 'd')
#define KT CAT(RaKernelsF, SUF)
#define ENG(name) CAT(CAT(name, _f), SUF)            /* the engine's typed names */
#define UT CAT(CAT(uint, SUF), _t)                  /* unsigned integer of T's width */
#define F(name) CAT(name, SUF)
#define NAME(s) (SUF == 32 ? "f32." s : "f64." s)

/* coarse: values on a grid of 1/8, so rows hold ties */
static void F(fill)(T *x, int64_t n, int coarse)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = coarse ? (T)((int)(rng_unit() * 8) / 8.0) : (T)rng_unit();
}

static void *F(alloc)(size_t bytes)   /* 64-byte aligned, zeroed */
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    memset(p, 0, (bytes + 63) / 64 * 64);
    return p;
}

/* One product shape (M×N, depth KD, every leading dimension LD): gemm accumulating, gemm,
 * gemm_tn accumulating, dumped as <tag>gemm.acc, <tag>gemm, <tag>gemm_tn; gemm_hinting
 * checked against gemm (the same bits), for hinting every line queued when they are all
 * owed after its first micro-tile, and for hinting some but not all of them when they
 * are paced over four times its multiply-adds. */
static void F(gemm_case)(const KT *K, int M, int N, int KD, int LD, const char *tag)
{
    T *A = F(alloc)(sizeof(T) * KD * LD), *B = F(alloc)(sizeof(T) * KD * LD);
    T *C = F(alloc)(sizeof(T) * M * LD);
    char name[32];
    F(fill)(A, (int64_t)KD * LD, 0);
    F(fill)(B, (int64_t)KD * LD, 0);
    F(fill)(C, (int64_t)M * LD, 0);
    K->gemm(M, N, KD, A, LD, B, LD, C, LD, 1);
    snprintf(name, sizeof name, "%sgemm.acc", tag);
    DUMP_AS(name, KIND, C, M * LD);
    K->gemm(M, N, KD, A, LD, B, LD, C, LD, 0);
    snprintf(name, sizeof name, "%sgemm", tag);
    DUMP_AS(name, KIND, C, M * LD);
    {
        T *C2 = F(alloc)(sizeof(T) * M * LD);
        enum { LINES = 1000 };
        uintptr_t lines[LINES];          /* runs of one line each */
        for (int i = 0; i < LINES; i++) lines[i] = (uintptr_t)(A + i % 64) & ~(uintptr_t)63;
        RaHints h = {lines, 0, 3};
        ra_hints_pace(&h, 1);            /* all three owed after the first micro-tile */
        int same = 1;
        K->gemm_hinting(M, N, KD, A, LD, B, LD, C2, LD, 0, &h);
        for (int i = 0; i < M; i++)        /* the M×N block; columns from N on are not C's */
            same &= memcmp(C + i * LD, C2 + i * LD, sizeof(T) * N) == 0;
        if (!same || (M >= 8 && h.next != h.count)) {
            fprintf(stderr, "kernel_check: %sgemm_hinting differs from gemm or left %d of its "
                    "lines\n", tag, h.count - h.next);
            self_check_failures++;
        }
        /* paced over four times this product's multiply-adds: some lines hinted, not all */
        RaHints paced = {lines, 0, LINES};
        ra_hints_pace(&paced, 4.0 * M * N * KD);
        K->gemm_hinting(M, N, KD, A, LD, B, LD, C2, LD, 0, &paced);
        if (M >= 8 && (paced.next == 0 || paced.next == paced.count)) {
            fprintf(stderr, "kernel_check: %sgemm_hinting hinted %d of %d lines paced over "
                    "four times its products\n", tag, paced.next, paced.count);
            self_check_failures++;
        }
        free(C2);
    }
    K->gemm_tn(M, N, KD, A, LD, B, LD, C, LD, 1);
    snprintf(name, sizeof name, "%sgemm_tn", tag);
    DUMP_AS(name, KIND, C, M * LD);
    free(A); free(B); free(C);
}

static void F(check_gemm)(const KT *K)
{
    F(gemm_case)(K, 13, 37, 29, 41, NAME(""));
    /* more than 64 rows and 64 deep: the blocks of the columns left over after whole
       vectors */
    F(gemm_case)(K, 70, 23, 140, 150, NAME("deep."));
}

static void F(check_softmax)(const KT *K)
{
    enum { BQ = 10, BK = 37, LD = 40, E = 9 };
    T *S = F(alloc)(sizeof(T) * BQ * LD), *acc = F(alloc)(sizeof(T) * BQ * E);
    T mx[BQ], sum[BQ], lse[BQ], delta[BQ];
    for (int i = 0; i < BQ; i++) { mx[i] = -(T)INFINITY; sum[i] = 0; }   /* acc 0 too */
    for (int step = 0; step < 2; step++) {
        if (step) F(fill)(acc, BQ * E, 0);   /* as if a product had accumulated */
        F(fill)(S, BQ * LD, 0);
        for (int i = 0; i < BQ * LD; i++) S[i] *= 4 + 4 * step;
        for (int j = 0; j < BK; j++) S[2 * LD + j] = -(T)INFINITY;   /* a row with no key */
        S[3 * LD + 5] = -(T)INFINITY;
        K->softmax_step(BQ, BK, S, LD, mx, sum, acc, E, E);
        DUMP_AS(step ? NAME("softmax_step.p1") : NAME("softmax_step.p0"), KIND, S, BQ * LD);
    }
    DUMP_AS(NAME("softmax_step.mx"), KIND, mx, BQ);
    DUMP_AS(NAME("softmax_step.sum"), KIND, sum, BQ);
    DUMP_AS(NAME("softmax_step.acc"), KIND, acc, BQ * E);

    F(fill)(S, BQ * LD, 0);
    F(fill)(lse, BQ, 0);
    lse[4] = -(T)INFINITY;
    K->exp_shift(BQ, BK, S, LD, lse);
    DUMP_AS(NAME("exp_shift"), KIND, S, BQ * LD);

    T *dP = F(alloc)(sizeof(T) * BQ * LD);
    F(fill)(dP, BQ * LD, 0);
    F(fill)(delta, BQ, 0);
    K->softmax_grad(BQ, BK, S, dP, LD, delta, (T)0.375);
    DUMP_AS(NAME("softmax_grad"), KIND, dP, BQ * LD);
    free(S); free(acc); free(dP);
}

static void F(check_mask_gather)(const KT *K)
{
    enum { BQ = 11, BK = 45, LD = 48 };
    T *S = F(alloc)(sizeof(T) * BQ * LD);
    int64_t qpos[BQ], kpos[BK], off[BQ];
    for (int i = 0; i < BQ; i++) qpos[i] = 3 * i + 2;
    for (int j = 0; j < BK; j++) kpos[j] = j % 9 == 4 ? -1 : j;
    for (int mode = 0; mode < 3; mode++) {
        F(fill)(S, BQ * LD, 0);
        K->mask_tile(BQ, BK, S, LD, qpos, kpos, mode >= 1, mode == 2);
        DUMP_AS(mode == 0 ? NAME("mask_tile.pad") : mode == 1 ? NAME("mask_tile.causal")
                                                              : NAME("mask_tile.self"),
                KIND, S, BQ * LD);
    }
    T *src = F(alloc)(sizeof(T) * 40 * 30), *dst = F(alloc)(sizeof(T) * 30 * LD);
    F(fill)(src, 40 * 30, 0);
    for (int r = 0; r < BQ; r++) off[r] = (int64_t)((r * 7) % 38) * 30 + r % 3;
    K->gather_t(BQ, 25, src, off, (T)-1.5, dst, LD);
    DUMP_AS(NAME("gather_t"), KIND, dst, 30 * LD);
    free(S); free(src); free(dst);
}

static void F(check_selection)(const KT *K)
{
    enum { R = 70, CB = 21, LD = 24, M = 5, CAP = 6 };
    T *s = F(alloc)(sizeof(T) * R * LD);
    F(fill)(s, R * LD, 1);
    s[3 * LD + 2] = NAN;
    for (int j = 0; j < CB; j++) s[9 * LD + j] = NAN;   /* an all-NaN row */
    for (int j = 0; j < CB; j++) s[10 * LD + j] = j % 3 ? -(T)INFINITY : NAN;   /* -inf at best */

    int64_t lab[R];
    T best[R];
    K->argmax_rows(R, CB, s, LD, lab, best);
    DUMP_AS(NAME("argmax_rows.lab"), 'i', lab, R);
    DUMP_AS(NAME("argmax_rows.best"), KIND, best, R);

    /* argmax_cols on sᵀ: argmax_rows' labels and values, over all R columns and over 53
       from column 1 (every instruction set's four-register, one-register and scalar
       paths) */
    {
        enum { LDT = R + 2 };
        T *st = F(alloc)(sizeof(T) * CB * LDT), bc[R];
        int64_t lc[R];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < CB; j++) st[j * LDT + r] = s[r * LD + j];
        for (int part = 0; part < 2; part++) {
            const int c0 = part ? 1 : 0, cols = part ? 53 : R;
            K->argmax_cols(CB, cols, st + c0, LDT, lc, bc);
            for (int i = 0; i < cols; i++)
                if (lc[i] != lab[c0 + i] ||
                    !(bc[i] == best[c0 + i] || (bc[i] != bc[i] && best[c0 + i] != best[c0 + i]))) {
                    fprintf(stderr, "kernel_check: %sargmax_cols column %d: %lld, %g; argmax_rows: "
                            "%lld, %g\n", NAME(""), c0 + i, (long long)lc[i], (double)bc[i],
                            (long long)lab[c0 + i], (double)best[c0 + i]);
                    self_check_failures++;
                }
        }
        DUMP_AS(NAME("argmax_cols.lab"), 'i', lc, 53);
        free(st);
    }

    T *top = F(alloc)(sizeof(T) * M * LD);
    UT *tpos = F(alloc)(sizeof(UT) * M * LD);
    for (int i = 0; i < M * LD; i++) top[i] = -(T)INFINITY;
    K->top_sample(R, CB, s, LD, M, top, LD, tpos);
    DUMP_AS(NAME("top_sample.top"), KIND, top, M * LD);
    DUMP_AS(NAME("top_sample.pos"), 'i', tpos, M * LD);

    const int L = CAP + RA_TOP_SLACK;
    T thr[CB + 1];
    int cnt[CB + 1] = {0};
    int32_t *pos = F(alloc)(sizeof(int32_t) * (CB + 1) * L);
    T *val = F(alloc)(sizeof(T) * (CB + 1) * L);
    for (int j = 0; j <= CB; j++) thr[j] = (T)(j % 4) / 4 - (T)0.5;
    K->top_admit(R, CB, s, LD, 100, thr, CAP, cnt, pos, val);
    DUMP_AS(NAME("top_admit.cnt"), 'i', cnt, CB);
    DUMP_AS(NAME("top_admit.thr"), KIND, thr, CB);
    for (int j = 0; j < CB; j++) {
        DUMP_AS(NAME("top_admit.pos"), 'i', pos + j * L, cnt[j]);
        DUMP_AS(NAME("top_admit.val"), KIND, val + j * L, cnt[j]);
    }

    free(s); free(top); free(tpos); free(pos); free(val);
}

/* top_offer over two calls of `cols` offers each into lists of capacity cap, against a
 * plain selection; the rows: coarse values (many ties), one NaN (row 1), NaN first
 * (row 2), unmasked -inf in every third column (row 3), the largest values all in one
 * lane (row 4), distinct decreasing values whose best cap fill the first call's list
 * (row 5: a floor one entry too high loses one). */
static void F(check_offer)(const KT *K, int cap, int cols)
{
    enum { ROWS = 6 };
    const int lds = (cols + 7) / 8 * 8 + 8;
    const int ldl = (cap + RA_OFFER_ALIGN - 1) / RA_OFFER_ALIGN * RA_OFFER_ALIGN;
    T *so = F(alloc)(sizeof(T) * ROWS * lds), *lv = F(alloc)(sizeof(T) * ROWS * ldl);
    UT *lj = F(alloc)(sizeof(UT) * ROWS * ldl);
    int64_t *kpos = F(alloc)(sizeof(int64_t) * cols);
    int *taken = F(alloc)(sizeof(int) * 2 * cols);
    int size[ROWS * 2] = {0};
    T *offered = F(alloc)(sizeof(T) * 2 * ROWS * lds);
    for (int call = 0; call < 2; call++) {   /* two calls: increasing positions */
        F(fill)(so, ROWS * lds, 1);
        so[lds + 7] = NAN;
        for (int j = 0; j < 3 && call == 0; j++) so[2 * lds + j] = NAN;
        for (int j = 0; j < cols; j += 3) so[3 * lds + j] = -(T)INFINITY;
        for (int j = 0; j < cols; j += 16) so[4 * lds + j] += 2;   /* the best in one lane */
        for (int j = 0; j < cols; j++)      /* no ties, the best spread over the lanes, */
            so[5 * lds + j] = (T)(cols - j) / 4096 - call;   /* all in the first call */
        for (int j = 0; j < cols; j++) kpos[j] = j % 13 == 5 ? -1 : call * cols + j;
        for (int r = 0; r < ROWS; r++)          /* masked entries hold -inf (the contract) */
            for (int j = 0; j < cols; j++)
                if (kpos[j] < 0) so[r * lds + j] = -(T)INFINITY;
        memcpy(offered + call * ROWS * lds, so, sizeof(T) * ROWS * lds);
        feclearexcept(FE_INVALID);
        K->top_offer(ROWS, cols, so, lds, kpos, cap, lv, lj, ldl, size, 2);
        if (quiet_offers && fetestexcept(FE_INVALID)) {
            fprintf(stderr, "kernel_check: %s top_offer cap %d raised the invalid flag for NaN "
                    "offers\n", NAME(""), cap);
            self_check_failures++;
        }
    }
    /* per row the cap best of the unmasked entries of both calls (larger value, ties to
       the earlier offer, NaN last), best first */
    for (int r = 0; r < ROWS; r++) {
        int want = 0;
        for (int o = 0; o < 2 * cols; o++) want += o % cols % 13 != 5;
        want = want < cap ? want : cap;
        memset(taken, 0, sizeof(int) * 2 * cols);
        int bad = size[2 * r] != want;
        for (int t = 0; t < want && !bad; t++) {
            int best = -1;
            for (int o = 0; o < 2 * cols; o++) {         /* o = call·cols + j: offer order */
                if (o % cols % 13 == 5 || taken[o]) continue;
                const T x = offered[o / cols * ROWS * lds + r * lds + o % cols];
                const T y = best < 0 ? 0 : offered[best / cols * ROWS * lds + r * lds + best % cols];
                if (best < 0 || (x == x && (y != y || x > y))) best = o;
            }
            taken[best] = 1;
            const T x = offered[best / cols * ROWS * lds + r * lds + best % cols];
            const T got = lv[r * ldl + t];
            bad |= !(got == x || (got != got && x != x)) || (int64_t)lj[r * ldl + t] != best;
        }
        if (bad) {
            fprintf(stderr, "kernel_check: %s top_offer cap %d row %d differs from a plain "
                    "selection\n", NAME(""), cap, r);
            self_check_failures++;
        }
    }
    char name[32];
    snprintf(name, sizeof name, "%s%d", NAME("top_offer.size.cap"), cap);
    DUMP_AS(name, 'i', size, ROWS * 2);
    for (int r = 0; r < ROWS; r++) {
        snprintf(name, sizeof name, "%s%d", NAME("top_offer.val.cap"), cap);
        DUMP_AS(name, KIND, lv + r * ldl, size[2 * r]);
        snprintf(name, sizeof name, "%s%d", NAME("top_offer.pos.cap"), cap);
        DUMP_AS(name, 'i', lj + r * ldl, size[2 * r]);
    }
    free(offered); free(so); free(lv); free(lj); free(kpos); free(taken);
}

static void F(check_rows)(const KT *K)
{
    enum { N = 40, D = 19, LD = 21, BITS = 45 };
    T *x = F(alloc)(sizeof(T) * N * LD);
    F(fill)(x, N * LD, 1);
    x[5 * LD + 3] = NAN;
    T best[D];
    int32_t barg[D];
    for (int strict = 0; strict < 2; strict++) {
        for (int c = 0; c < D; c++) { best[c] = -(T)INFINITY; barg[c] = -1; }
        K->pool_scan(x, LD, 2, N - 1, 1, D, best, barg, strict);
        K->pool_scan(x, LD, N - 1, 0, -1, D, best, barg, strict);
        DUMP_AS(strict ? NAME("pool_scan.strict.best") : NAME("pool_scan.best"), KIND, best, D);
        DUMP_AS(strict ? NAME("pool_scan.strict.arg") : NAME("pool_scan.arg"), 'i', barg, D);
    }

    T out[64], norm, sq, res[3 * 66];
    for (int d = 0; d < 3; d++) {
        const int len = d == 0 ? 1 : d == 1 ? 7 : 61;
        T row[64];
        F(fill)(row, len, 0);
        K->normalize_row(row, len, out, &norm, &sq);
        memcpy(res + d * 66, out, sizeof(T) * len);
        res[d * 66 + 64] = norm;
        res[d * 66 + 65] = sq;
    }
    T zero[8] = {0};
    K->normalize_row(zero, 8, out, &norm, &sq);
    DUMP_AS(NAME("normalize_row.zero"), KIND, out, 8);
    DUMP_AS(NAME("normalize_row"), KIND, res, 1);
    DUMP_AS(NAME("normalize_row.7"), KIND, res + 66, 7);
    DUMP_AS(NAME("normalize_row.61"), KIND, res + 132, 61);
    DUMP_AS(NAME("normalize_row.norms"), KIND, res + 64, 2);

    T *S = F(alloc)(sizeof(T) * N * 48), thr[BITS];
    int64_t codes[N];
    F(fill)(S, N * 48, 1);
    F(fill)(thr, BITS, 1);
    S[48 + 4] = NAN;
    K->threshold_bits(N, BITS, S, 48, thr, codes);
    DUMP_AS(NAME("threshold_bits"), 'i', codes, N);

    /* k-means++ potentials: 3 candidates over 37 rows (a tail of 5), a NaN cosine, a NaN
       best, cosines of 1 and above (weight 0), invalid rows; against the sums in double */
    enum { PR = 37, PL = 3, PLD = 40 };
    T cosv[PL * PLD], bestv[PR];
    uint8_t validv[PR];
    F(fill)(cosv, PL * PLD, 0);
    F(fill)(bestv, PR, 0);
    /* one division each (no multiply-add to contract: the same inputs on every machine),
       so that 1 − x is inexact in T */
    for (int i = 0; i < PL * PLD; i++) cosv[i] = cosv[i] / (T)3;
    for (int r = 0; r < PR; r++) bestv[r] = bestv[r] / (T)7;
    for (int r = 0; r < PR; r++) validv[r] = r % 5 != 3;
    cosv[PLD + 6] = NAN;
    bestv[11] = NAN;
    cosv[2 * PLD + 20] = 1;
    cosv[2 * PLD + 21] = (T)1.5;
    double pot[PL] = {0.5, 0, -1}, want[PL];
    for (int t = 0; t < PL; t++) {
        want[t] = 0;
        for (int r = 0; r < PR; r++) {
            const T v = cosv[t * PLD + r] > bestv[r] ? cosv[t * PLD + r] : bestv[r];
            const double w = 1.0 - (double)v;
            want[t] += validv[r] && w > 0 ? w * w : 0;
        }
        want[t] += pot[t];
    }
    feclearexcept(FE_ALL_EXCEPT);
    K->seed_potential(PR, PL, cosv, PLD, bestv, validv, pot);
    feclearexcept(FE_ALL_EXCEPT);       /* the NaN's comparisons may flag invalid */
    for (int t = 0; t < PL; t++)
        if (!(fabs(pot[t] - want[t]) <= 1e-12 * (fabs(want[t]) + 1))) {
            fprintf(stderr, "kernel_check: %sseed_potential[%d] = %.17g, want %.17g\n",
                    NAME(""), t, pot[t], want[t]);
            self_check_failures++;
        }
    DUMP_AS(NAME("seed_potential"), 'd', pot, PL);
    free(x); free(S);
}

/* The engine: two key lists of one tile each (the second with padding) through forward
   and backward, causal, with a query tile of 50 rows. */
static void F(check_engine)(const KT *K)
{
    enum { ROWS = 50, D = 16, E = 12, C1 = 100, C2 = 60 };
    const int cols[2] = {C1, C2};
    T *q = F(alloc)(sizeof(T) * ROWS * D), *acc = F(alloc)(sizeof(T) * ROWS * E);
    T *s = F(alloc)(sizeof(T) * RA_BQ * RA_BK), *dp = F(alloc)(sizeof(T) * RA_BQ * RA_BK);
    T mx[ROWS], sum[ROWS], out[ROWS * E], lse[ROWS], delta[ROWS];
    int64_t qpos[ROWS], kpos[2][C1];
    T *k[2], *kt[2], *v[2], *vt[2], *dk[2], *dv[2];
    ENG(RaKeys) list[2];
    for (int i = 0; i < ROWS; i++) qpos[i] = 3 * i + 7;
    F(fill)(q, ROWS * D, 0);
    for (int t = 0; t < 2; t++) {
        const int n = cols[t];
        k[t] = F(alloc)(sizeof(T) * n * D); kt[t] = F(alloc)(sizeof(T) * D * n);
        v[t] = F(alloc)(sizeof(T) * n * E); vt[t] = F(alloc)(sizeof(T) * E * n);
        dk[t] = F(alloc)(sizeof(T) * n * D); dv[t] = F(alloc)(sizeof(T) * n * E);
        F(fill)(k[t], n * D, 0);
        F(fill)(v[t], n * E, 0);
        for (int j = 0; j < n; j++) {
            kpos[t][j] = t == 1 && j % 7 == 3 ? -1 : t * C1 + j;
            for (int f = 0; f < D; f++) kt[t][f * n + j] = k[t][j * D + f];
            for (int f = 0; f < E; f++) vt[t][f * n + j] = v[t][j * E + f];
        }
        list[t] = (ENG(RaKeys)){.count = n, .kt = kt[t], .ldkt = n, .v = v[t], .ldv = E,
                                .k = k[t], .ldk = D, .vt = vt[t], .ldvt = n, .pos = kpos[t]};
    }
    const int flags = RA_CAUSAL;
    ENG(RaQTile) qt = {.rows = ROWS, .q = q, .pos = qpos, .mx = mx, .sum = sum, .acc = acc,
                       .s = s, .lds = 0};
    ENG(ra_fwd_init)(&qt, E);
    for (int t = 0; t < 2; t++) ENG(ra_attend)(K, &qt, &list[t], D, E, flags);
    ENG(ra_fwd_finish)(&qt, E, (char *)out, E * sizeof(T), sizeof(T), (char *)lse, sizeof(T));
    DUMP_AS(NAME("engine.out"), KIND, out, ROWS * E);
    DUMP_AS(NAME("engine.lse"), KIND, lse, ROWS);

    T *dout = F(alloc)(sizeof(T) * ROWS * E), *dq = F(alloc)(sizeof(T) * ROWS * D);
    F(fill)(dout, ROWS * E, 0);
    for (int i = 0; i < ROWS; i++) {
        T dsum = 0;
        for (int f = 0; f < E; f++) dsum += dout[i * E + f] * out[i * E + f];
        delta[i] = dsum;
    }
    ENG(RaQGradTile) g = {.rows = ROWS, .q = q, .dout = dout, .lse = lse, .delta = delta,
                          .pos = qpos, .dq = dq, .s = s, .dp = dp};
    for (int t = 0; t < 2; t++)
        ENG(ra_attend_backward)(K, &g, &list[t], dk[t], D, dv[t], E, D, E, flags, NULL);
    DUMP_AS(NAME("engine.dq"), KIND, dq, ROWS * D);
    for (int t = 0; t < 2; t++) {
        DUMP_AS(NAME("engine.dk"), KIND, dk[t], cols[t] * D);
        DUMP_AS(NAME("engine.dv"), KIND, dv[t], cols[t] * E);
        free(k[t]); free(kt[t]); free(v[t]); free(vt[t]); free(dk[t]); free(dv[t]);
    }
    free(q); free(acc); free(s); free(dp); free(dout); free(dq);
}

static void F(check)(const KT *K)
{
    F(check_gemm)(K);
    F(check_softmax)(K);
    F(check_mask_gather)(K);
    F(check_selection)(K);
    F(check_offer)(K, 6, 50);      /* one vector of list, few offers */
    F(check_offer)(K, 40, 700);    /* lists of several vectors, batches */
    F(check_offer)(K, 100, 900);   /* no floor: many batches while the list fills */
    F(check_offer)(K, 20, 2100);   /* the floor (float and double), a block boundary */
    F(check_rows)(K);
    F(check_engine)(K);
}

#undef CAT_
#undef CAT
#undef F
#undef NAME
#undef KIND
#undef KT
#undef ENG
#undef UT
#undef T
#undef SUF
