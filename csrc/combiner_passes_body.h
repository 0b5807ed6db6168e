/* combiner_passes_body.h — Combiner's passes on the engine: region summaries
 * (pass 1), queries (pass 2), forward and backward drivers.
 * Included by combiner_body.h (once per type, with its macros). */

/* ------------------------------------------------------------------ pass 1: regions */
/* Region unit u of wave w.  q, k (n, d), v (n, e) -> khat rows of the summary keys it
 * owns, vhat (rows, e) and rlse (rows) of its regions:
 *   k̂ = max_j k_j,  q̂ = max_j q_j (or the region's query row),
 *   v̂ = Σ_j softmax_j(scale·q̂·k_j) v_j   over the members j.
 * Up to RA_BQ regions share one engine tile; their different runs are a bitmap. */
static void FN(region_unit_forward)(const KT *K, const RaCPlan *p, FN(CWs) *w, int wave,
                                    int64_t u, RaMat q, RaMat k, RaMat v, T sc, int d, int e,
                                    FN(CTab) *tb)
{
    const int64_t nv = FN(region_unit_setup)(p, w, wave, u, q, k, v, sc, d, e, 0);
    for (int64_t r = 0; r < nv; r++) {
        const RaCRegion h = ra_cplan_region(p, w->vids[r]);
        if (h.owns_kid)
            memcpy(tb->khat + (h.kid - tb->kbase) * d, w->pk + r * d, sizeof(T) * (size_t)d);
    }
    for (int64_t a = 0; a < nv; a += RA_BQ) {
        const int rows = (int)(nv - a < RA_BQ ? nv - a : RA_BQ);
        int c0, c1;
        const int ragged = FN(region_tile)(p, w, a, a + rows, q, sc, d, &c0, &c1);
        FN(RaQTile) qt = w->qt;
        qt.rows = rows;
        FN(ra_fwd_init)(&qt, e);
        FN(CRegionKeys) rk = {p, w, tb, k, v, nv, a, c0, c1, d, e, 0};
        const FN(RaKeys) keys = FN(region_keys)(&rk, ragged);
        FN(ra_attend)(K, &qt, &keys, d, e, 0);
        FN(ra_fwd_finish)(&qt, e, (char *)w->otile, e * sizeof(T), sizeof(T), (char *)w->olse,
                          sizeof(T));
        for (int r = 0; r < rows; r++) {
            const int64_t vid = w->vids[a + r] - tb->vbase;
            memcpy(tb->vhat + vid * e, w->otile + (ptrdiff_t)r * e, sizeof(T) * (size_t)e);
            tb->rlse[vid] = w->olse[r];
        }
    }
}

/* ------------------------------------------------------------------ pass 2: queries */
/* Summary positions of a query tile (the row or column its summaries are matched with). */
static void FN(summary_qpos)(const RaCPlan *p, const RaCUnit *U, const int64_t *qidx, int rows,
                             int64_t *sqpos)
{
    for (int r = 0; r < rows; r++)
        sqpos[r] = U->sq == RA_SQ_ROW ? qidx[r] / p->M : U->sq == RA_SQ_COL ? qidx[r] % p->M : 0;
}

/* The key lists of a query unit for the engine: direct keys and summary entries, with
 * the planner's bitmap for RA_SQ_VIS units (the callback's context names the query rows). */
typedef struct {
    FN(RaKeys) direct, summary;
    RaCVisCtx dvis, svis;
} FN(CUnitKeys);

/* Pack a query unit's key lists into uk: direct keys from k, v; summary entries from the
 * tables.  The forward takes kᵀ and v, the backward (bwd) kᵀ, k and vᵀ. */
static void FN(unit_keys)(const RaCPlan *p, const RaCUnit *U, FN(CWs) *w, int64_t ns, RaMat k,
                          RaMat v, const FN(CTab) *tb, int d, int e, int bwd, FN(CUnitKeys) *uk)
{
    const int nd = (int)U->direct.count, S = (int)ns, bitmap = U->sq == RA_SQ_VIS;
    const RaMat kh = {(char *)tb->khat, (ptrdiff_t)d * (ptrdiff_t)sizeof(T), sizeof(T)};
    const RaMat vh = {(char *)tb->vhat, (ptrdiff_t)e * (ptrdiff_t)sizeof(T), sizeof(T)};
    FN(range_list)(U->q, w->qidx);
    FN(range_list)(U->direct, w->didx);
    for (int j = 0; j < S; j++) {   /* the summaries' rows in this phase's tables */
        w->kloc[j] = w->kid[j] - tb->kbase;
        w->vloc[j] = w->vid[j] - tb->vbase;
        w->sid[j] = -1 - w->vid[j];
    }
    uk->direct = FN(ra_pack_keys)(k, w->didx, v, w->didx, nd, d, e, 1, bwd ? w->k_d : NULL,
                                  w->kt_d, bwd ? NULL : w->v_d, bwd ? w->vt_d : NULL);
    uk->summary = FN(ra_pack_keys)(kh, w->kloc, vh, w->vloc, S, d, e, 1, bwd ? w->k_s : NULL,
                                   w->kt_s, bwd ? NULL : w->v_s, bwd ? w->vt_s : NULL);
    uk->dvis = (RaCVisCtx){p, w->vis, NULL, w->didx, 0};
    uk->svis = (RaCVisCtx){p, w->vis, NULL, w->vid, 1};
    uk->direct.pos = w->didx;
    uk->summary.pos = w->spos;
    uk->summary.ids = w->sid;
    uk->direct.tile_vis = uk->summary.tile_vis = bitmap ? ra_cunit_vis : NULL;
    uk->direct.ctx = &uk->dvis;
    uk->summary.ctx = &uk->svis;
}

/* Query unit u of a pass: q (n, d) -> out rows (or the carried state when a later pass
 * follows).  out_i = Σ_direct e^{s_ij} v_j + Σ_summaries e^{q̃_i·k̂} v̂, over one Z_i. */
static void FN(query_unit_forward)(const KT *K, const RaCPlan *p, FN(CWs) *w, int pass,
                                   int64_t u, RaMat q, RaMat k, RaMat v, T sc, int d, int e,
                                   FN(CTab) *tb, RaMat out, RaVec lse)
{
    RaCUnit U;
    const int64_t ns = ra_cplan_unit(p, pass, u, &U, w->kid, w->vid, w->spos);
    const int nq = (int)U.q.count;
    const int last = pass == ra_cplan_npasses(p) - 1;
    FN(CUnitKeys) uk;
    FN(unit_keys)(p, &U, w, ns, k, v, tb, d, e, 0, &uk);
    for (int q0 = 0; q0 < nq; q0 += RA_BQ) {
        const int rows = nq - q0 < RA_BQ ? nq - q0 : RA_BQ;
        const int64_t *qpos = w->qidx + q0;
        FN(RaQTile) qt = w->qt;
        qt.rows = rows;
        qt.pos = qpos;
        qt.pairs = tb->direct_pairs;
        FN(ra_gather)(q, qpos, 0, rows, d, sc, 0, w->qs, d);
        if (pass == 0) FN(ra_fwd_init)(&qt, e);
        else FN(ra_attend_restore)(&qt, e, qpos, tb->st_mx, tb->st_sum, tb->st_acc);
        uk.dvis.qpos = uk.svis.qpos = qpos;
        FN(ra_attend)(K, &qt, &uk.direct, d, e, U.dflags);
        FN(summary_qpos)(p, &U, qpos, rows, w->sqpos);
        qt.pos = w->sqpos;                      /* summaries are matched by row or column */
        qt.ids = qpos;                          /* and named by query position, -1 - vid */
        qt.pairs = tb->summary_pairs;
        FN(ra_attend)(K, &qt, &uk.summary, d, e, U.sflags);
        if (last) {
            const ptrdiff_t os0 = out.s0 * U.q.stride, ls0 = lse.s0 * U.q.stride;
            FN(ra_fwd_finish)(&qt, e, out.data + qpos[0] * out.s0, os0, out.s1,
                              lse.data ? lse.data + qpos[0] * lse.s0 : NULL, ls0);
        } else
            FN(ra_attend_save)(&qt, e, qpos, tb->st_mx, tb->st_sum, tb->st_acc);
    }
}

/* The region summaries (khat, vhat, rlse) of phase ph of one problem; ws holds nt
 * thread scratch blocks. */
static void FN(problem_summaries)(const KT *K, const RaCPlan *p, int ph, FN(CWs) *ws, int nt,
                                  RaMat q, RaMat k, RaMat v, T sc, int d, int e, FN(CTab) *tb)
{
    const RaCPhase f = ra_cplan_phase(p, ph);
    tb->kbase = f.kbase;
    tb->vbase = f.vbase;
    /* regions write disjoint summaries: the phase's waves run as one parallel loop */
    int64_t total = 0;
    for (int w = f.wave0; w < f.wave1; w++) total += ra_cplan_wave_units(p, w);
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t x = 0; x < total; x++) {
        int w = f.wave0;
        int64_t u = x;
        while (u >= ra_cplan_wave_units(p, w)) u -= ra_cplan_wave_units(p, w++);
        FN(region_unit_forward)(K, p, &ws[ra_thread_id()], w, u, q, k, v, sc, d, e, tb);
    }
}

/* The forward of one problem, phase by phase: summaries, then the passes reading them;
 * the last pass finishes every query's softmax -> out, lse. */
static void FN(problem_forward)(const KT *K, const RaCPlan *p, FN(CWs) *ws, int nt,
                                RaMat q, RaMat k, RaMat v, T sc, int d, int e, FN(CTab) *tb,
                                RaMat out, RaVec lse)
{
    for (int ph = 0; ph < ra_cplan_nphases(p); ph++) {
        const RaCPhase f = ra_cplan_phase(p, ph);
        FN(problem_summaries)(K, p, ph, ws, nt, q, k, v, sc, d, e, tb);
        for (int pass = f.pass0; pass < f.pass1; pass++) {
            const int64_t nu = ra_cplan_pass_units(p, pass);
            #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
            for (int64_t u = 0; u < nu; u++)
                FN(query_unit_forward)(K, p, &ws[ra_thread_id()], pass, u, q, k, v, sc, d, e,
                                       tb, out, lse);
        }
    }
}

/* Scratch for one problem: the tables plus nt thread blocks, grown as needed. */
typedef struct {
    char *tab_buf, *ws_buf;
    size_t tab_have, ws_have;
} FN(CBufs);

static int FN(problem_setup)(FN(CBufs) *bf, const RaCPlan *p, int nt, int d, int e, int mode,
                             FN(CTab) *tb, FN(CWs) *ws)
{
    RaCSizes z;
    ra_cplan_sizes(p, &z);
    RaArena a = {NULL, 0};
    FN(ctab_layout)(tb, &a, p, &z, d, e, mode);
    if (FN(cgrow)(&bf->tab_buf, &bf->tab_have, a.used)) return RA_ERR_NOMEM;
    a = (RaArena){bf->tab_buf, 0};
    FN(ctab_layout)(tb, &a, p, &z, d, e, mode);
    RaArena m = {NULL, 0};
    FN(cws_layout)(&ws[0], &m, &z, d, e, mode & RA_CT_BACKWARD);
    const size_t per_thread = m.used;
    if (FN(cgrow)(&bf->ws_buf, &bf->ws_have, ra_mul(per_thread, (size_t)nt))) return RA_ERR_NOMEM;
    for (int t = 0; t < nt; t++) {
        RaArena x = {bf->ws_buf + (size_t)t * per_thread, 0};
        FN(cws_layout)(&ws[t], &x, &z, d, e, mode & RA_CT_BACKWARD);
    }
    return RA_OK;
}

/* A driver's run over its problems: the broadcast scalars, the grown scratch and the
 * threads' tile sets. */
typedef struct {
    int n, d, e, mode, nt;
    RaBVec plan, block, causal, scale;
    FN(CBufs) bf;
    FN(CWs) *ws;
} FN(CRun);

static int FN(run_open)(FN(CRun) *r, int n, int d, int e, int mode, RaBVec plan, RaBVec block,
                        RaBVec causal, RaBVec scale)
{
    *r = (FN(CRun)){n, d, e, mode, ra_num_threads(), plan, block, causal, scale,
                    {NULL, NULL, 0, 0}, NULL};
    r->ws = ra_alloc(sizeof(FN(CWs)) * (size_t)r->nt);
    return r->ws ? RA_OK : RA_ERR_NOMEM;
}

/* Problem b: its plan (from the broadcast scalars), tables, tiles and pair terms; its
 * scale in *sc. */
static int FN(run_problem)(FN(CRun) *r, ptrdiff_t b, RaCPlan *p, FN(CTab) *tb, T *sc,
                           const RaBPairs *pairs, T *dbias)
{
    *sc = RA_VEC_AT(T, ra_vec_at(r->scale, b), 0);
    int st = ra_cplan_init(p, (int)RA_VEC_AT(int64_t, ra_vec_at(r->plan, b), 0), r->n,
                           RA_VEC_AT(int64_t, ra_vec_at(r->block, b), 0),
                           RA_VEC_AT(uint8_t, ra_vec_at(r->causal, b), 0));
    if (st == RA_OK) st = FN(problem_setup)(&r->bf, p, r->nt, r->d, r->e, r->mode, tb, r->ws);
    if (st != RA_OK) return st;
    tb->direct_pairs = FN(ra_pairs_at)(pairs, b, r->n, NULL, &tb->pr);
    tb->sp = tb->pr;
    tb->sp.bias = NULL;
    tb->summary_pairs = tb->direct_pairs && tb->pr.drop ? &tb->sp : NULL;
    tb->dbias = tb->direct_pairs && tb->pr.bias ? dbias : NULL;
    return RA_OK;
}

static void FN(run_close)(FN(CRun) *r)
{
    ra_free(r->ws);
    ra_free(r->bf.tab_buf);
    ra_free(r->bf.ws_buf);
}

/* q, k (B; n, d), v (B; n, e), plan, block (B) int64, causal (B) uint8, scale (B)
 * -> out (B; n, e) */
int FN(ra_combiner_forward)(ptrdiff_t B, int n, int d, int e, RaBMat q, RaBMat k, RaBMat v,
                            RaBVec plan, RaBVec block, RaBVec causal, RaBVec scale,
                            const RaBPairs *pairs, RaBMat out, RaBVec lse)
{
    const KT *K = &ra_kernels()->KSEL;
    FN(CRun) run;
    int st = FN(run_open)(&run, n, d, e, RA_CT_FORWARD, plan, block, causal, scale);
    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        RaCPlan p;
        FN(CTab) tb;
        T sc;
        if ((st = FN(run_problem)(&run, b, &p, &tb, &sc, pairs, NULL)) != RA_OK) break;
        FN(problem_forward)(K, &p, run.ws, run.nt, ra_mat_at(q, b), ra_mat_at(k, b),
                            ra_mat_at(v, b), sc, d, e, &tb, ra_mat_at(out, b),
                            lse.data ? ra_vec_at(lse, b) : (RaVec){NULL, 0});
    }
    FN(run_close)(&run);
    return st;
}

/* ------------------------------------------------------------------ backward */
/* Query unit u of a pass, backward of pass 2.  In the forward this was
 *   s = q̃·[k_direct | k̂_summaries],  p = exp(s − lse),  out = p·[v_direct | v̂]
 * so the engine gives dq̃ (rows owned by this unit in this pass, added to dqs), dk, dv of
 * the direct keys (owned too, added to dks, dvs) and dk̂, dv̂ of the summary entries,
 * which several units share: those go to this unit's slots, summed later in unit order. */
static void FN(query_unit_backward)(const KT *K, const RaCPlan *p, FN(CWs) *w, int pass,
                                    int64_t u, RaMat q, RaMat k, RaMat v, RaMat dout, T sc,
                                    int d, int e, FN(CTab) *tb, int64_t slot, T *dbias_window)
{
    /* the direct pairs' bias gradient goes to this unit's own window (see pass_backward) */
    FN(RaPairs) direct;
    const FN(RaPairs) *dpairs = tb->direct_pairs;
    if (dpairs && dbias_window) {
        direct = *dpairs;
        direct.dbias = dbias_window;
        dpairs = &direct;
    }
    RaCUnit U;
    const int64_t ns = ra_cplan_unit(p, pass, u, &U, w->kid, w->vid, w->spos);
    const int nq = (int)U.q.count, nd = (int)U.direct.count, S = (int)ns;
    FN(CUnitKeys) uk;
    FN(unit_keys)(p, &U, w, ns, k, v, tb, d, e, 1, &uk);
    memset(w->dk_d, 0, sizeof(T) * (size_t)nd * d);
    memset(w->dv_d, 0, sizeof(T) * (size_t)nd * e);
    memset(w->dk_s, 0, sizeof(T) * (size_t)S * d);
    memset(w->dv_s, 0, sizeof(T) * (size_t)S * e);
    for (int q0 = 0; q0 < nq; q0 += RA_BQ) {
        const int rows = nq - q0 < RA_BQ ? nq - q0 : RA_BQ;
        const int64_t *qpos = w->qidx + q0;
        FN(ra_gather)(q, qpos, 0, rows, d, sc, 0, w->qs, d);
        FN(ra_gather)(dout, qpos, 0, rows, e, 1, 0, w->dout, e);
        for (int r = 0; r < rows; r++) {
            w->lse[r] = tb->lse[qpos[r]];
            w->delta[r] = tb->delta[qpos[r]];
        }
        memset(w->dq, 0, sizeof(T) * (size_t)rows * d);
        FN(RaQGradTile) g = w->gt;
        g.rows = rows;
        g.pos = qpos;
        g.pairs = dpairs;
        uk.dvis.qpos = uk.svis.qpos = qpos;
        FN(ra_attend_backward)(K, &g, &uk.direct, w->dk_d, d, w->dv_d, e, d, e, U.dflags, NULL);
        FN(summary_qpos)(p, &U, qpos, rows, w->sqpos);
        g.pos = w->sqpos;
        g.ids = qpos;
        g.pairs = tb->summary_pairs;
        FN(ra_attend_backward)(K, &g, &uk.summary, w->dk_s, d, w->dv_s, e, d, e, U.sflags, NULL);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < d; c++) tb->dqs[qpos[r] * d + c] += w->dq[(ptrdiff_t)r * d + c];
    }
    for (int j = 0; j < nd; j++) {
        for (int c = 0; c < d; c++) tb->dks[w->didx[j] * d + c] += w->dk_d[(ptrdiff_t)j * d + c];
        for (int c = 0; c < e; c++) tb->dvs[w->didx[j] * e + c] += w->dv_d[(ptrdiff_t)j * e + c];
    }
    memcpy(tb->slot_dk + slot * d, w->dk_s, sizeof(T) * (size_t)S * d);
    memcpy(tb->slot_dv + slot * e, w->dv_s, sizeof(T) * (size_t)S * e);
    memcpy(tb->slot_kid + slot, w->kloc, sizeof(int64_t) * (size_t)S);
    memcpy(tb->slot_vid + slot, w->vloc, sizeof(int64_t) * (size_t)S);
}

/* The packed window's member gradients (dk_m, dv_m) added to dks, dvs. */
static void FN(region_flush)(FN(CWs) *w, int d, int e, FN(CTab) *tb)
{
    for (int j = 0; j < w->win1 - w->win0; j++) {
        const int64_t at = w->midx[j];
        for (int c = 0; c < d; c++) tb->dks[at * d + c] += w->dk_m[(ptrdiff_t)j * d + c];
        for (int c = 0; c < e; c++) tb->dvs[at * e + c] += w->dv_m[(ptrdiff_t)j * e + c];
    }
}

/* Region unit u of wave w, backward of pass 1 given dkhat, dvhat.  In the forward:
 *   k̂ = max_j k_j            so dk_{argmax} += dk̂          (per element, ties: lowest j)
 *   v̂ = softmax(q̂̃·kᵀ)·v     so the engine gives dq̂̃, dk_j, dv_j with lse = rlse
 *   q̂ = max_j q_j (or a row) so dq̃_{argmax} += dq̂̃
 * Member gradients gather per window in span columns (dk_m, dv_m) and are added to dks,
 * dvs once.  Every position written lies inside the unit's span, disjoint within the wave. */
static void FN(region_unit_backward)(const KT *K, const RaCPlan *p, FN(CWs) *w, int wave,
                                     int64_t u, RaMat q, RaMat k, RaMat v, T sc, int d, int e,
                                     FN(CTab) *tb)
{
    const int64_t nv = FN(region_unit_setup)(p, w, wave, u, q, k, v, sc, d, e, 1);
    if (nv == 0) return;
    for (int64_t a = 0; a < nv; a += RA_BQ) {
        const int rows = (int)(nv - a < RA_BQ ? nv - a : RA_BQ);
        int c0, c1;
        const int ragged = FN(region_tile)(p, w, a, a + rows, q, sc, d, &c0, &c1);
        for (int r = 0; r < rows; r++) {
            const int64_t vid = w->vids[a + r] - tb->vbase;
            const T dl = FN(ra_dot)((const char *)(tb->dvhat + vid * e), sizeof(T),
                                    (const char *)(tb->vhat + vid * e), sizeof(T), e);
            memcpy(w->dout + (ptrdiff_t)r * e, tb->dvhat + vid * e, sizeof(T) * (size_t)e);
            w->lse[r] = tb->rlse[vid];
            w->delta[r] = dl;
        }
        memset(w->dq, 0, sizeof(T) * (size_t)rows * d);
        FN(RaQGradTile) gt = w->gt;
        gt.rows = rows;
        FN(CRegionKeys) rk = {p, w, tb, k, v, nv, a, c0, c1, d, e, 1};
        const FN(RaKeys) keys = FN(region_keys)(&rk, ragged);
        FN(ra_attend_backward)(K, &gt, &keys, NULL, d, NULL, e, d, e, 0, NULL);
        const RaRange sp = w->span;
        for (int r = 0; r < rows; r++) {
            const RaCRegion h = ra_cplan_region(p, w->vids[a + r]);
            const T *dqr = w->dq + (ptrdiff_t)r * d;
            if (h.qsrc >= 0)
                for (int c = 0; c < d; c++) tb->dqs[h.qsrc * d + c] += dqr[c];
            else
                for (int c = 0; c < d; c++)
                    tb->dqs[(sp.start + w->aq[(a + r) * d + c] * sp.stride) * d + c] += dqr[c];
        }
    }
    if (w->win1 > w->win0) {   /* the last window (started, if no tile came) */
        FN(region_window)(p, w, nv, w->win0, w->win1, k, v, d, e, tb, 1);
        FN(region_flush)(w, d, e, tb);
    }
}

/* The offsets j - i of a query unit's direct pairs: [*lo, *lo + width), width returned
 * (0 without direct keys). */
static int64_t FN(unit_offsets)(const RaCUnit *U, int64_t *lo)
{
    if (U->q.count == 0 || U->direct.count == 0) return *lo = 0, 0;
    const int64_t qlast = U->q.start + (U->q.count - 1) * U->q.stride;
    const int64_t dlast = U->direct.start + (U->direct.count - 1) * U->direct.stride;
    *lo = U->direct.start - qlast;
    return dlast - U->q.start - *lo + 1;
}

/* Query pass `pass` backward, in chunks of units whose summary-gradient slots fit the
 * budget; after each chunk the slots are summed into dkhat, dvhat in unit order, and
 * (with a relative bias) each unit's bias-gradient window into tb->dbias, in unit order.
 * RA_ERR_NOMEM if the windows cannot be allocated. */
static int FN(pass_backward)(const KT *K, const RaCPlan *p, int pass, FN(CWs) *ws, int nt,
                             RaMat q, RaMat k, RaMat v, RaMat dout, T sc, int d, int e,
                             FN(CTab) *tb)
{
    const int64_t nu = ra_cplan_pass_units(p, pass);
    int64_t *wlo = NULL, *woff = NULL, wbudget = 0;
    T *win = NULL;
    if (tb->dbias) {               /* windows: at most 4n entries per chunk, or one unit's */
        wlo = ra_alloc(ra_mul(sizeof(int64_t), (size_t)nu));
        woff = ra_alloc(ra_mul(sizeof(int64_t), (size_t)nu + 1));
        if (!wlo || !woff) { ra_free(wlo); ra_free(woff); return RA_ERR_NOMEM; }
        woff[0] = 0;
        for (int64_t u = 0; u < nu; u++) {
            RaCUnit U;
            ra_cplan_unit(p, pass, u, &U, NULL, NULL, NULL);
            const int64_t width = FN(unit_offsets)(&U, &wlo[u]);
            woff[u + 1] = woff[u] + width;
            wbudget = width > wbudget ? width : wbudget;
        }
        wbudget = 4 * p->n > wbudget ? 4 * p->n : wbudget;
        win = ra_alloc(ra_mul(sizeof(T), (size_t)wbudget));
        if (!win) { ra_free(wlo); ra_free(woff); return RA_ERR_NOMEM; }
    }
    tb->offs[0] = 0;
    for (int64_t u = 0; u < nu; u++) {
        RaCUnit U;
        tb->offs[u + 1] = tb->offs[u] + ra_cplan_unit(p, pass, u, &U, NULL, NULL, NULL);
    }
    for (int64_t u0 = 0, u1; u0 < nu; u0 = u1) {
        u1 = u0 + 1;
        while (u1 < nu && tb->offs[u1 + 1] - tb->offs[u0] <= tb->budget &&
               (!win || woff[u1 + 1] - woff[u0] <= wbudget)) u1++;
        if (win) memset(win, 0, sizeof(T) * (size_t)(woff[u1] - woff[u0]));
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
        for (int64_t u = u0; u < u1; u++)
            FN(query_unit_backward)(K, p, &ws[ra_thread_id()], pass, u, q, k, v, dout, sc, d, e,
                                    tb, tb->offs[u] - tb->offs[u0],
                                    win ? win + (woff[u] - woff[u0]) - wlo[u] : NULL);
        for (int64_t u = u0; win && u < u1; u++) {       /* unit order: the same bits */
            const T *x = win + (woff[u] - woff[u0]);
            T *dst = tb->dbias + wlo[u];
            for (int64_t t = 0; t < woff[u + 1] - woff[u]; t++) dst[t] += x[t];
        }
        /* threads split the channels, so every element's additions keep the unit order
           (bit-identical for any nt) */
        const int64_t ns = tb->offs[u1] - tb->offs[u0];
        const int kblocks = (d + 15) / 16, vblocks = (e + 15) / 16;
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int cb = 0; cb < kblocks + vblocks; cb++) {
            const int is_k = cb < kblocks, width = is_k ? d : e;
            const int c0 = (is_k ? cb : cb - kblocks) * 16;
            const int c1 = c0 + 16 < width ? c0 + 16 : width;
            T *dst = is_k ? tb->dkhat : tb->dvhat;
            const T *src = is_k ? tb->slot_dk : tb->slot_dv;
            const int64_t *id = is_k ? tb->slot_kid : tb->slot_vid;
            for (int64_t s = 0; s < ns; s++) {
                T *o = dst + id[s] * width;
                const T *r = src + s * width;
                for (int c = c0; c < c1; c++) o[c] += r[c];
            }
        }
    }
    ra_free(win);
    ra_free(wlo);
    ra_free(woff);
    return RA_OK;
}

/* a matrix (n, width) whose rows are packed one after the other */
static int FN(packed)(RaBMat m, int width)
{
    return m.s1 == (ptrdiff_t)sizeof(T) && m.s0 == (ptrdiff_t)width * (ptrdiff_t)sizeof(T);
}

/* dout, q, k, v (B; n, ·) -> dq, dk (B; n, d), dv (B; n, e), written.  Per problem:
 *   1. out, lse saved or recomputed (the forward leaves its last phase's summaries in
 *      the tables); delta = rowsum(dout∘out)
 *   2. phase by phase, the last first: the phase's summaries (khat, vhat, rlse) unless
 *      held, its query passes backward (-> dkhat, dvhat), its region waves backward
 *   3. dq = scale·dq̃; dk, dv copied out unless they were the accumulators */
int FN(ra_combiner_backward)(ptrdiff_t B, int n, int d, int e, RaBMat dout, RaBMat q,
                             RaBMat k, RaBMat v, RaBMat saved_out, RaBVec saved_lse,
                             RaBVec plan, RaBVec block, RaBVec causal, RaBVec scale,
                             const RaBPairs *pairs, RaBMat dq, RaBMat dk, RaBMat dv)
{
    const KT *K = &ra_kernels()->KSEL;
    /* packed outputs accumulate the gradients in place, sparing three (n, ·) tables */
    const int in_place = FN(packed)(dq, d) && FN(packed)(dk, d) && FN(packed)(dv, e);
    const int mode = RA_CT_BACKWARD | (saved_out.data ? 0 : RA_CT_OUT) | (in_place ? 0 : RA_CT_GRADS);
    FN(CRun) run;
    int st = FN(run_open)(&run, n, d, e, mode, plan, block, causal, scale);
    FN(CWs) *const ws = run.ws;
    const int nt = run.nt;
    /* the relative bias gradient of a problem, entry j - i + n - 1 */
    const int r = pairs->bias.data && pairs->dbias.data ? 2 * n - 1 : 0;
    T *dbias = r ? ra_alloc(ra_mul(sizeof(T), (size_t)r)) : NULL;
    if (r && !dbias) st = RA_ERR_NOMEM;
    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        RaCPlan p;
        FN(CTab) tb;
        T sc;
        if ((st = FN(run_problem)(&run, b, &p, &tb, &sc, pairs, dbias ? dbias + (n - 1) : NULL))
            != RA_OK) break;
        if (dbias) memset(dbias, 0, sizeof(T) * (size_t)r);
        const RaMat qb = ra_mat_at(q, b), kb = ra_mat_at(k, b), vb = ra_mat_at(v, b);
        const RaMat gb = ra_mat_at(dout, b);
        const RaMat dqm = ra_mat_at(dq, b), dkm = ra_mat_at(dk, b), dvm = ra_mat_at(dv, b);
        if (in_place) {
            tb.dqs = (T *)dqm.data;
            tb.dks = (T *)dkm.data;
            tb.dvs = (T *)dvm.data;
        }

        /* 1. out (n, e) and lse (n), saved or recomputed; delta (n) */
        RaMat outm = {(char *)tb.out, (ptrdiff_t)e * (ptrdiff_t)sizeof(T), sizeof(T)};
        int held = -1;   /* the phase whose summaries the tables hold */
        if (saved_out.data) {
            outm = ra_mat_at(saved_out, b);
            const RaVec sl = ra_vec_at(saved_lse, b);
            for (int i = 0; i < n; i++) tb.lse[i] = RA_VEC_AT(T, sl, i);
        } else {
            const RaVec lsev = {(char *)tb.lse, sizeof(T)};
            FN(problem_forward)(K, &p, ws, nt, qb, kb, vb, sc, d, e, &tb, outm, lsev);
            held = ra_cplan_nphases(&p) - 1;
        }
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            tb.delta[i] = FN(ra_dot)(gb.data + (ptrdiff_t)i * gb.s0, gb.s1,
                                     outm.data + (ptrdiff_t)i * outm.s0, outm.s1, e);
        }
        memset(tb.dqs, 0, sizeof(T) * (size_t)n * d);
        memset(tb.dks, 0, sizeof(T) * (size_t)n * d);
        memset(tb.dvs, 0, sizeof(T) * (size_t)n * e);

        /* 2. phases */
        for (int ph = ra_cplan_nphases(&p) - 1; ph >= 0; ph--) {
            const RaCPhase f = ra_cplan_phase(&p, ph);
            if (ph != held) FN(problem_summaries)(K, &p, ph, ws, nt, qb, kb, vb, sc, d, e, &tb);
            memset(tb.dkhat, 0, sizeof(T) * (size_t)f.nk * d);
            memset(tb.dvhat, 0, sizeof(T) * (size_t)f.nv * e);
            for (int pass = f.pass0; pass < f.pass1 && st == RA_OK; pass++)
                st = FN(pass_backward)(K, &p, pass, ws, nt, qb, kb, vb, gb, sc, d, e, &tb);
            if (st != RA_OK) break;
            for (int w = f.wave0; w < f.wave1; w++) {
                const int64_t nu = ra_cplan_wave_units(&p, w);
                #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
                for (int64_t u = 0; u < nu; u++)
                    FN(region_unit_backward)(K, &p, &ws[ra_thread_id()], w, u, qb, kb, vb, sc, d,
                                             e, &tb);
            }
        }

        /* 3. outputs */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            T *dqs = tb.dqs + (ptrdiff_t)i * d;
            if (in_place) {
                for (int c = 0; c < d; c++) dqs[c] *= sc;
                continue;
            }
            for (int c = 0; c < d; c++) RA_MAT_AT(T, dqm, i, c) = sc * dqs[c];
            for (int c = 0; c < d; c++) RA_MAT_AT(T, dkm, i, c) = tb.dks[(ptrdiff_t)i * d + c];
            for (int c = 0; c < e; c++) RA_MAT_AT(T, dvm, i, c) = tb.dvs[(ptrdiff_t)i * e + c];
        }
        if (st == RA_OK) FN(ra_pairs_write_dbias)(pairs, b, r, dbias, 1);
    }
    ra_free(dbias);
    FN(run_close)(&run);
    return st;
}
