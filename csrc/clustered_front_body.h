/* clustered_front_body.h — typed clustered-attention planner, its shared front end
 * (clustered.c: plan, centroid, top-k and residual, or the last three from a forward's
 * saved statistics); included by clustered_body.h per dtype with T, KT, KSEL and
 * FN(name) = name##_<suffix>. */

/* ------------------------------------------------------------------ shared front end */
/* Problem b's pair terms of the centroid weights into *cp: its dropout only (a centroid
 * has no position, so no bias), NULL without dropout. */
static const FN(RaPairs) *FN(cl_centroid_pairs)(const RaBPairs *bp, ptrdiff_t b, int n,
                                                FN(RaPairs) *cp)
{
    if (!FN(ra_pairs_at)(bp, b, n, NULL, cp) || !cp->drop) return NULL;
    cp->bias = NULL;
    cp->dbias = NULL;
    return cp;
}

/* Steps 3-4 of cl_front from a forward's saved statistics: o_c, lse_c copied; T_c and
 * a_c[T_c] copied after checking that T_c's positions are increasing, in [0, m), and
 * exactly k = min(topk, unmasked keys) of them (RA_ERR_INDEX otherwise); then r_c, m̂_c. */
static int FN(cl_front_saved)(ptrdiff_t B, int m, int e, int C, int kmax, int G, RaBMat v,
                              char *packs, size_t per_problem, int backward,
                              const RaClusteredSaved *saved, int nt, int n, int d,
                              const RaBPairs *pairs)
{
    int status = RA_OK;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const ptrdiff_t b = unit / C;
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        RaMat so = ra_mat_at(saved->o, b);
        for (int f = 0; f < e; f++) p.oc[(ptrdiff_t)c * e + f] = RA_MAT_AT(T, so, c, f);
        p.lsec[c] = RA_VEC_AT(T, ra_vec_at(saved->lse, b), c);
        if (kmax > 0) {
            RaMat ss = ra_mat_at(saved->sel, b), sa = ra_mat_at(saved->aw, b);
            int64_t *sel = p.sel + (size_t)c * kmax, prev = -1;
            T *aw = p.aw + (size_t)c * kmax;
            const int kc = (int)p.info[1];
            int bad = 0;
            for (int t = 0; t < kmax; t++) {
                sel[t] = RA_MAT_AT(int64_t, ss, c, t);
                aw[t] = RA_MAT_AT(T, sa, c, t);
                bad |= t < kc ? (sel[t] <= prev || sel[t] >= m) : sel[t] != -1;
                if (t < kc) prev = sel[t];
            }
            if (bad) {
                #pragma omp atomic write
                status = RA_ERR_INDEX;
                sel[0] = -1;                     /* nothing is read through it */
            }
        }
        if (kmax > 0) {
            FN(RaPairs) cp;
            FN(cl_residual)(ra_mat_at(v, b), e, kmax, &p, c, FN(cl_centroid_pairs)(pairs, b, n, &cp));
        } else {
            memcpy(p.r + (ptrdiff_t)c * e, p.oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
            p.mhat[c] = 0;
        }
    }
    return status;
}

/* Everything both directions need, for all B problems: plans, centroids, the centroid
 * attention (o_c, lse_c), and for the improved form T_c, a_c[T_c], m̂_c and r_c (plain:
 * r_c = o_c, m̂_c = 0).  Problem b's buffers start at packs + b·per_problem. */
static int FN(cl_front)(const KT *K, ptrdiff_t B, int n, int m, int d, int e, int C,
                        int topk, int kmax, int G, RaBMat q, RaBMat k, RaBMat v,
                        RaBVec labels, RaBVec key_mask, RaBVec scale, char *packs,
                        size_t per_problem, int backward, char *scratch, size_t per_thread,
                        int nt, const RaClusteredSaved *saved, const RaBPairs *pairs)
{
    const int nkb = (m + RA_BK - 1) / RA_BK, nct = (C + RA_CL_ROWS - 1) / RA_CL_ROWS;
    int status = RA_OK;

    /* 1. member lists */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        if (FN(cl_plan)(n, m, C, topk, ra_vec_at(labels, b), ra_vec_at(key_mask, b), &p)) {
            #pragma omp atomic write
            status = RA_ERR_INDEX;
        }
    }
    if (status != RA_OK) return status;

    /* 2. centroids: one problem per unit (its rows read in order) when there are
       problems for every thread, else one (problem, cluster) per unit; either way each
       centroid sums its members by increasing position, so the same bits */
    if (B >= nt) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++) {
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
            FN(cl_centroids_scan)(ra_mat_at(q, b), ra_vec_at(labels, b), n, d, C, &p);
        }
    } else {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * C; unit++) {
            const ptrdiff_t b = unit / C;
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
            FN(cl_centroid)(ra_mat_at(q, b), d, &p, (int)(unit % C));
        }
    }

    if (saved && saved->o.data) return FN(cl_front_saved)(B, m, e, C, kmax, G, v, packs,
                                                          per_problem, backward, saved, nt, n, d,
                                                          pairs);

    /* 3. centroid attention, one (problem, centroid tile, key group) per unit, so one
       problem keeps every thread busy, collecting the top-k candidates of the improved
       form on the way; then the groups merged by log-sum-exp */
    const int blocks_per_group = nkb ? (nkb + G - 1) / G : 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * nct * G; unit++) {
        const ptrdiff_t b = unit / ((ptrdiff_t)nct * G);
        const int ct = (int)(unit / G % nct), g = (int)(unit % G);
        const int c0 = ct * RA_CL_ROWS, rows = C - c0 < RA_CL_ROWS ? C - c0 : RA_CL_ROWS;
        const int t0 = g * blocks_per_group < nkb ? g * blocks_per_group : nkb;
        const int t1 = t0 + blocks_per_group < nkb ? t0 + blocks_per_group : nkb;
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        FN(ClTiles) w;
        FN(cl_tiles)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, e, kmax, &w);
        FN(RaPairs) cp;
        FN(cl_centroid_group)(K, &w, ra_mat_at(k, b), ra_mat_at(v, b), ra_vec_at(key_mask, b),
                              m, d, e, RA_VEC_AT(T, ra_vec_at(scale, b), 0), &p, c0, rows,
                              t0, t1, g, G, kmax, FN(cl_centroid_pairs)(pairs, b, n, &cp));
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + unit / C * per_problem, n, d, e, C, kmax, G, backward, &p);
        FN(cl_centroid_merge)(&p, (int)(unit % C), G, e);
    }

    /* 4. T_c, m̂_c, r_c per (problem, cluster) */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const ptrdiff_t b = unit / C;
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        if (kmax > 0) {
            FN(RaPairs) cp;
            FN(cl_select)(ra_mat_at(v, b), e, G, kmax, &p, c, backward,
                          FN(cl_centroid_pairs)(pairs, b, n, &cp));
        } else {
            memcpy(p.r + (ptrdiff_t)c * e, p.oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
            p.mhat[c] = 0;
        }
    }
    return RA_OK;
}
