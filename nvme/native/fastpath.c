/* vnvmed native data path: one poll of a worker's queues for the common case.
 *
 * Theory of operation
 * -------------------
 * nvme/qpair.py (QueueRunner) is the reference; this file does the same for the
 * commands that dominate a benchmark or a busy guest and nothing else:
 *
 *   CQ head doorbells -> SQ tail doorbell -> SQE -> Read/Write with PRPs (or one SGL
 *   data block) -> copy between guest memory and a ram (or null) namespace -> CQE,
 *   DW3 last -> which vectors to signal.
 *
 * Everything else is handed back to Python, which runs the same command (or the same
 * poll) on the Python path: vn_poll() returns VN_NEED_SQE with the SQE still unfetched
 * at the head of sq[stop_sq] (an error status, an unknown opcode, an SGL segment, a
 * chained PRP list, memory without fd, a message-write window, a namespace served by
 * another backend, a CID with parked commands on its SQ), or VN_NEED_POLL before doing
 * anything (a doorbell value that must be reported, a broken queue).  So this file
 * only ever completes commands with status 0, and every error answer comes from the
 * Python code that the tests pin.  After Python ran that SQE it calls vn_poll() again
 * with `resume` set, and the round goes on where it stopped, exactly as one poll of
 * QueueRunner would have gone (same SQ order, same tails, same room): the two paths
 * leave the same bytes in guest memory (tests/unit/test_native_differential.py).
 *
 * State: queue progress lives in the queue-table records (SEAMS S1); they are read at
 * the start of each queue's turn and written back (one aligned 32-bit store per word)
 * before we return, so Python sees them exactly as its own code would have left them.
 *
 * Guest input: each SQE and each PRP list is copied once and decoded from the copy (a
 * guest rewriting it meanwhile cannot change what we checked); every address range is
 * checked with overflow-checked 64-bit arithmetic against the region table before any
 * byte is touched (a range ending at 2^64 does not wrap into one that fits).
 *
 * File namespaces (kind 3): a Read/Write/Flush that passes the same checks goes to the
 * namespace's io_uring ring (uring.c) instead of being copied: the command is parked
 * as Python parks it (SEAMS S2) - its CID journaled in the SQ's crash journal before
 * the SQ head is published past it (nvme.crashjournal, same words, same order), its
 * CQ slot reserved (cq->native counts with Python's parked ones in the room) - and
 * vn_reap() later posts its CQE with the same poster as every other command, clears
 * the journal bit between the entry and the CQ tail, marks read data and CQEs dirty
 * and signals like a poll.  A failure goes back to Python (vn_ring_take), which maps
 * the errno and reports it.  A full ring (the namespace's depth bound) stops the SQ
 * until completions come; a CID that is still in flight stops before the SQE with
 * `conflict` set (Python answers it).
 *
 * Shared words (DESIGN 4): doorbells and shadow doorbells are read with one aligned
 * 32-bit acquire load, SQEs only after the tail covering them; CQE DW0..DW2 are
 * written first and DW3 (CID, status, phase) last with one release store; EventIdx is
 * stored, then a full fence, then the shadow tail is read again.
 */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#include "fastpath.h"
#include "uring.h"

#define PAGE 4096u
#define MAXPRP 512u                     /* one PRP list page, no chaining */
#define BROKEN 2u
/* queue-table record words (nvme/qtable.py) */
#define SQ_FLAGS 0
#define SQ_HEAD 3
#define SQ_TAIL 4
#define CQ_FLAGS 0
#define CQ_TAIL 3
#define CQ_PHASE 4
#define CQ_HEAD 5
/* vn_poll() result bits above the count of completed commands */
#define VN_NEED_SQE (1 << 20)
#define VN_NEED_POLL (1 << 21)
#define VN_SIGNAL (1 << 22)
#define VN_MORE (1 << 23)
#define VN_STALE (1 << 24)
#define VN_BACK (1 << 25)               /* ring requests wait in a back list (vn_ring_take) */

#ifndef VN_SOURCE_ID
#define VN_SOURCE_ID "unknown"
#endif

const char *vn_source_id(void) { return VN_SOURCE_ID; }

static inline uint32_t ld(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* ---------------------------------------------------------------- guest memory */

/* Host address of [addr, addr+len) if it lies inside one fd-mapped region with the
 * needed permission; NULL otherwise (Python decides: error, slow path, split). */
static uint8_t *xlate(const struct vn_ctx *c, uint64_t addr, uint64_t len, int write)
{
    uint64_t end;
    if (len == 0 || __builtin_add_overflow(addr, len, &end))
        return NULL;
    for (uint32_t i = 0; i < c->nreg; i++) {
        const struct vn_region *r = &c->reg[i];
        if (addr < r->iova || addr - r->iova >= r->size)
            continue;
        if (end - r->iova > r->size || r->host == NULL || !(write ? r->w : r->r))
            return NULL;
        return r->host + (addr - r->iova);
    }
    return NULL;
}

static int in_window(const struct vn_ctx *c, uint64_t addr, uint64_t len)
{
    uint64_t end = addr + len;          /* xlate() proved this does not wrap */
    for (uint32_t i = 0; i < c->nwin; i++)
        if (c->win[2 * i] < end && addr < c->win[2 * i + 1])
            return 1;
    return 0;
}

/* The device wrote [addr, addr+len): mark its pages in every byte map covering them
 * (after the write completed, SEAMS S3). */
static void mark(const struct vn_ctx *c, uint64_t addr, uint64_t len)
{
    uint64_t end = addr + len;
    for (uint32_t i = 0; i < c->ndirty; i++) {
        const struct vn_dirty *d = &c->dirty[i];
        uint64_t lo = addr > d->iova ? addr : d->iova;
        uint64_t hi = end < d->iova + d->size ? end : d->iova + d->size;
        if (lo >= hi)
            continue;
        uint64_t a = (lo >> 12) - d->first, b = ((hi - 1) >> 12) - d->first + 1;
        memset(d->bm + a, 1, b - a);
    }
}

/* ---------------------------------------------------------------- crash journal */

/* nvme.crashjournal.park_cid: the CID half-word first, then its occupancy bit. */
#define J_OVERFLOW_WORD 3
#define J_OVERFLOW (1u << 31)
static int32_t jpark(uint32_t *j, uint32_t cid)
{
    for (uint32_t w = 0; w < 4; w++) {
        uint32_t occ = j[w];
        uint32_t free = ~occ & (w == J_OVERFLOW_WORD ? 0x7FFFFFFFu : 0xFFFFFFFFu);
        if (free) {
            uint32_t b = (uint32_t)__builtin_ctz(free), slot = 32 * w + b;
            uint32_t cw = 4 + (slot >> 1), shift = 16 * (slot & 1);
            st(&j[cw], (j[cw] & ~(0xFFFFu << shift)) | ((cid & 0xFFFF) << shift));
            __atomic_store_n(&j[w], occ | (1u << b), __ATOMIC_RELEASE);
            return (int32_t)slot;
        }
    }
    st(&j[J_OVERFLOW_WORD], j[J_OVERFLOW_WORD] | J_OVERFLOW);
    return -1;
}

/* nvme.crashjournal.unpark_slot */
static void junpark(uint32_t *j, int32_t slot, int none_left)
{
    if (slot >= 0)
        __atomic_store_n(&j[slot >> 5], j[slot >> 5] & ~(1u << (slot & 31)), __ATOMIC_RELEASE);
    if (none_left && j[J_OVERFLOW_WORD] & J_OVERFLOW)
        st(&j[J_OVERFLOW_WORD], j[J_OVERFLOW_WORD] & ~J_OVERFLOW);
}

/* ---------------------------------------------------------------- CQEs */

/* The one CQE poster: DW0..DW2, then DW3 (CID, status 0, phase) in one release store. */
static inline void put_cqe(uint32_t *e, uint32_t sqhd_sqid, uint32_t cid, uint32_t phase)
{
    e[0] = 0;
    e[1] = 0;
    e[2] = sqhd_sqid;
    __atomic_store_n(&e[3], (cid & 0xFFFF) | (phase << 16), __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- one command */

struct seg { uint64_t addr, len; };

/* The data segments of a PRP-described transfer, coalesced; 0 if anything is unusual. */
static uint32_t prp_segs(const struct vn_ctx *c, uint64_t prp1, uint64_t prp2, uint64_t len,
                         struct seg *out)
{
    uint64_t first = PAGE - (prp1 & (PAGE - 1));
    if (prp1 & 3)
        return 0;
    if (first >= len) {
        out[0] = (struct seg){prp1, len};
        return 1;
    }
    uint64_t rest = len - first;
    out[0] = (struct seg){prp1, first};
    if (rest <= PAGE) {
        if (prp2 & (PAGE - 1))
            return 0;
        if (prp2 == prp1 + first) {
            out[0].len += rest;
            return 1;
        }
        out[1] = (struct seg){prp2, rest};
        return 2;
    }
    uint64_t npages = (rest + PAGE - 1) / PAGE;
    if (prp2 & 7 || npages > (PAGE - (prp2 & (PAGE - 1))) / 8)
        return 0;                       /* misaligned or chained list: Python */
    const uint8_t *lst = xlate(c, prp2, npages * 8, 0);
    if (lst == NULL)
        return 0;
    uint64_t ent[MAXPRP];
    memcpy(ent, lst, npages * 8);       /* read the guest's list once */
    uint32_t n = 1;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t e = ent[i], l = rest > PAGE ? PAGE : rest;
        if (e & (PAGE - 1))
            return 0;
        if (out[n - 1].addr + out[n - 1].len == e)
            out[n - 1].len += l;
        else
            out[n++] = (struct seg){e, l};
        rest -= l;
    }
    return n;
}

enum { EX_DONE = 0, EX_PYTHON = 1, EX_PARKED = 2, EX_FULL = 3 };

/* Put a checked command on its namespace's ring (kind 3): parked, completed by vn_reap. */
static int park_on_ring(struct vn_ctx *c, struct vn_sq *sq, const struct vn_ns *ns, const uint32_t *d,
                        const struct seg *segs, uint8_t *const *host, uint32_t nseg, uint64_t len)
{
    struct vn_ring *r = ns->ring;
    uint32_t opc = d[0] & 0xFF;
    if (nseg > VN_MAXSEG || sq->j == NULL)
        return EX_PYTHON;
    struct vn_req *q = vn_ring_get(r);
    if (q == NULL)
        return EX_FULL;
    q->qid = sq->qid;
    q->cid = d[0] >> 16;
    q->opc = opc;
    q->nsid = d[1];
    q->slba = d[10] | ((uint64_t)d[11] << 32);
    q->off = q->slba << ns->shift;
    q->len = q->left = len;
    q->nseg = q->niov = nseg;
    q->first = 0;
    q->fd = r->dfd >= 0 ? r->dfd : r->bfd;
    q->rw_flags = opc == 1 && d[12] & (1u << 30) ? RWF_DSYNC : 0;     /* FUA */
    for (uint32_t i = 0; i < nseg; i++) {
        q->iov[i].iov_base = host[i];
        q->iov[i].iov_len = segs[i].len;
        q->gaddr[i] = segs[i].addr;
        q->glen[i] = segs[i].len;
    }
    q->jslot = jpark(sq->j, q->cid);    /* before the head is published past it */
    vn_ring_queue(r, q);
    /* Into the kernel now, one command per enter, as fio does by default: the same
     * commands entered once per round (~10 per enter at QD32) kept as many reads in
     * flight on the VM's virtio disk but each took ~30 % longer there (fio with
     * --iodepth_batch_submit=16 shows the same), 0.81-0.92x of fio instead of 0.99-1.0x.
     * A crash before the head is published is covered: recovery skips a journaled CID
     * at the head (it completes Command Interrupted; the I/O is idempotent). */
    vn_ring_enter(r);
    sq->native++;
    c->cq[sq->cq].native++;
    c->newp++;
    return EX_PARKED;
}

/* Execute one SQE (a private copy) if it is a plain Read/Write (or a Flush of a file
 * namespace) this file serves: EX_DONE (status 0), EX_PARKED (on a ring), EX_FULL (the
 * ring is at its depth bound: try again later), EX_PYTHON (hand it to Python). */
static int exec_rw(struct vn_ctx *c, struct vn_sq *sq, const uint32_t *d)
{
    uint32_t dw0 = d[0], opc = dw0 & 0xFF, psdt = (dw0 >> 14) & 3;
    int read = opc == 2;
    if (opc == 0 && !(dw0 & 0xC300) && d[1] && d[1] < c->nns && c->ns[d[1]].kind == 3)
        return park_on_ring(c, sq, &c->ns[d[1]], d, NULL, NULL, 0, 0);
    if ((opc != 1 && opc != 2) || dw0 & 0x300 || psdt == 3)
        return 1;
    uint32_t nsid = d[1];
    if (nsid == 0 || nsid >= c->nns || c->ns[nsid].kind == 0)
        return 1;
    const struct vn_ns *ns = &c->ns[nsid];
    if (ns->kind == 3 && ns->ring->busy >= ns->ring->depth)
        return EX_FULL;                 /* before any work: the SQE stays for later */
    uint64_t slba = d[10] | ((uint64_t)d[11] << 32), nlb = (d[12] & 0xFFFF) + 1, end;
    uint64_t len = nlb << ns->shift;
    if ((c->mdts && len > c->mdts) || __builtin_add_overflow(slba, nlb, &end) ||
        end > ns->blocks || (!read && ns->ro))
        return 1;                       /* errors: Python answers them */
    struct seg segs[MAXPRP + 1];
    uint32_t nseg;
    if (psdt == 0) {
        nseg = prp_segs(c, d[6] | ((uint64_t)d[7] << 32), d[8] | ((uint64_t)d[9] << 32), len, segs);
    } else {                            /* SGL: one Data Block descriptor of exactly len */
        if ((d[9] >> 24) != 0 || d[8] != len)
            return 1;
        segs[0] = (struct seg){d[6] | ((uint64_t)d[7] << 32), len};
        nseg = 1;
    }
    if (nseg == 0)
        return 1;
    uint8_t *host[MAXPRP + 1];
    for (uint32_t i = 0; i < nseg; i++) {
        host[i] = xlate(c, segs[i].addr, segs[i].len, read);
        if (host[i] == NULL || (read && c->nwin && in_window(c, segs[i].addr, segs[i].len)))
            return 1;
    }
    if (ns->kind == 3)
        return park_on_ring(c, sq, ns, d, segs, host, nseg, len);
    uint64_t off = slba << ns->shift;
    for (uint32_t i = 0; i < nseg; i++) {
        if (ns->kind == 1) {
            if (read)
                memcpy(host[i], ns->data + off, segs[i].len);
            else
                memcpy(ns->data + off, host[i], segs[i].len);
        } else if (read) {
            memset(host[i], 0, segs[i].len);
        }
        off += segs[i].len;
    }
    if (read) {
        if (c->ndirty)
            for (uint32_t i = 0; i < nseg; i++)
                mark(c, segs[i].addr, segs[i].len);
        c->io[0]++;
        c->io[2] += len;
    } else {
        c->io[1]++;
        c->io[3] += len;
    }
    return 0;
}

/* ---------------------------------------------------------------- the poll */

static int cq_head_ok(uint32_t old, uint32_t tail, uint32_t size, uint32_t head)
{
    return head < size && (head + size - old) % size <= (tail + size - old) % size;
}

/* Is (qid, cid) in flight on a ring (a host reusing a CID it has not seen complete)? */
static int cid_in_flight(const struct vn_ctx *c, uint32_t qid, uint32_t cid)
{
    for (uint32_t i = 0; i < c->nrings; i++) {
        const struct vn_ring *r = c->rings[i];
        if (r->busy == 0)
            continue;
        for (uint32_t k = 0; k < r->depth; k++)
            if (r->req[k].state == VN_BUSY && r->req[k].qid == qid && r->req[k].cid == cid)
                return 1;
    }
    return 0;
}

/* One SQ's turn (QueueRunner._run_sq + _fetch).  Returns commands completed; sets
 * *flags (VN_NEED_*, VN_MORE, VN_STALE). */
static int run_sq(struct vn_ctx *c, uint32_t si, int budget, int *flags)
{
    struct vn_sq *sq = &c->sq[si];
    struct vn_cq *cq = &c->cq[sq->cq];
    uint32_t *rec = sq->rec, *crec = cq->rec;
    int use_sh = c->sh_db != NULL && sq->qid != 0;
    uint32_t tail = c->tails[si];       /* read (and checked) when the round began */
    uint32_t size = sq->size, csize = cq->size;
    if (tail != rec[SQ_TAIL]) {
        st(&rec[SQ_TAIL], tail);
        *flags |= VN_STALE;
    }
    uint32_t head = rec[SQ_HEAD], ctail = crec[CQ_TAIL], phase = crec[CQ_PHASE] & 1;
    if (head >= size || ctail >= csize || crec[CQ_HEAD] >= csize) {
        *flags |= VN_NEED_POLL;         /* a record we did not write (a bad restore):  */
        return 0;                       /* never index a ring with it - Python's call */
    }
    int64_t room = (int64_t)csize - 1 - (ctail + csize - crec[CQ_HEAD]) % csize - cq->inflight - cq->native;
    int64_t n = (tail + size - head) % size;
    if (n > room)
        n = room > 0 ? room : 0;
    if (n > budget) {
        n = budget;
        *flags |= VN_MORE;
    }
    uint32_t *ring = cq->ring, hi = sq->qid << 16, posted = 0;
    int done = 0, parked = 0, full = 0;
    sq->full = NULL;
    for (int64_t k = 0; k < n; k++) {
        uint32_t sqe[16];
        memcpy(sqe, sq->ring + head * 16, 64);      /* after the tail load (acquire) */
        int ex;
        if (sq->native && cid_in_flight(c, sq->qid, sqe[0] >> 16)) {
            c->conflict = 1;            /* Python answers CID Conflict */
            ex = EX_PYTHON;
        } else if (sq->parked) {
            ex = EX_PYTHON;             /* Python checks its own parked CIDs */
        } else {
            ex = exec_rw(c, sq, sqe);
        }
        if (ex == EX_FULL) {
            full = 1;                   /* the next completion wakes us for the rest */
            sq->full = c->ns[sqe[1]].ring;   /* exec_rw checked the NSID */
            break;
        }
        if (ex == EX_PYTHON) {
            c->stop_sq = si;
            *flags |= VN_NEED_SQE;
            break;
        }
        if (++head == size)
            head = 0;
        if (ex == EX_PARKED) {
            st(&rec[SQ_HEAD], head);    /* journaled: the head may pass it now */
            parked++;
            continue;
        }
        put_cqe(ring + ctail * 4, head | hi, sqe[0] >> 16, phase);
        if (posted++ == 0)
            cq->first = cq->posted ? cq->first : ctail;
        if (++ctail == csize) {
            ctail = 0;
            phase ^= 1;
        }
        done++;
    }
    if (done || parked) {
        st(&rec[SQ_HEAD], head);
        st(&crec[CQ_TAIL], ctail);
        st(&crec[CQ_PHASE], phase);
        cq->posted += posted;
        *flags |= VN_STALE;
    }
    if (*flags & VN_NEED_SQE)
        return done;                    /* Python takes the SQE; EventIdx after that */
    if (use_sh && !c->lazy) {
        st(&c->sh_ei[sq->dbi], tail);
        if (c->ndirty)
            mark(c, c->ei_iova + 4 * sq->dbi, 4);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (ld(&c->sh_db[sq->dbi]) != tail)
            *flags |= VN_MORE;          /* the host may not have rung: poll again */
    }
    if (head != tail && !(*flags & VN_MORE) && !full) {
        room = (int64_t)csize - 1 - (ctail + csize - crec[CQ_HEAD]) % csize - cq->inflight - cq->native;
        if (room > 0)
            *flags |= VN_MORE;
    }
    return done;
}

/* Start of a round: every doorbell is read and checked before anything is done, so a
 * value Python must report sends the whole poll to Python (VN_NEED_POLL) untouched. */
static int begin_round(struct vn_ctx *c, int *flags)
{
    uint32_t heads[64];
    for (uint32_t i = 0; i < c->ncq; i++) {
        struct vn_cq *cq = &c->cq[i];
        uint32_t *rec = cq->rec;
        uint32_t h = (c->sh_db != NULL && cq->qid) ? ld(&c->sh_db[cq->dbi]) : ld(&c->db[cq->dbi]);
        if (rec[CQ_FLAGS] & BROKEN ||
            (h != rec[CQ_HEAD] && !cq_head_ok(rec[CQ_HEAD], rec[CQ_TAIL], cq->size, h)))
            return 0;                   /* Python reports it (once) and marks it broken */
        heads[i] = h;
    }
    for (uint32_t i = 0; i < c->nsq; i++) {
        struct vn_sq *sq = &c->sq[i];
        uint32_t t = (c->sh_db != NULL && sq->qid) ? ld(&c->sh_db[sq->dbi]) : ld(&c->db[sq->dbi]);
        if (sq->rec[SQ_FLAGS] & BROKEN || t >= sq->size)
            return 0;
        c->tails[i] = t;
    }
    for (uint32_t i = 0; i < c->ncq; i++) {
        if (heads[i] != c->cq[i].rec[CQ_HEAD]) {
            st(&c->cq[i].rec[CQ_HEAD], heads[i]);
            *flags |= VN_STALE;
        }
    }
    return 1;
}

/* After a round: dirty marks for the CQEs it wrote, and its interrupts - one eventfd
 * write per CQ that got entries (IEN), or the vector handed to Python when it has no
 * fd here or interrupt coalescing is on (Python keeps the coalescing timers). */
static int end_round(struct vn_ctx *c)
{
    int flags = 0;
    for (uint32_t i = 0; i < c->ncq; i++) {
        struct vn_cq *cq = &c->cq[i];
        if (!cq->posted)
            continue;
        if (c->ndirty) {                /* the CQEs written, possibly wrapping */
            uint32_t a = cq->first, cnt = cq->posted;
            uint32_t run = cnt < cq->size - a ? cnt : cq->size - a;
            mark(c, cq->base + 16 * (uint64_t)a, 16 * (uint64_t)run);
            if (run < cnt)
                mark(c, cq->base, 16 * (uint64_t)(cnt - run));
        }
        if (c->coalesce) {
            flags |= VN_SIGNAL;
        } else if (cq->ien) {
            uint64_t one = 1;
            if (cq->irqfd >= 0) {
                if (write(cq->irqfd, &one, sizeof(one)) < 0) {
                    /* a full counter or a closed fd: the guest reads the CQ anyway */
                }
                continue;
            }
            uint32_t j = 0;
            while (j < c->nirq && c->irq[j] != cq->iv)
                j++;
            if (j == c->nirq && c->nirq < 64)
                c->irq[c->nirq++] = cq->iv;
            flags |= VN_SIGNAL;
        }
    }
    return flags;
}

/* One poll: rounds over every SQ (QueueRunner.poll) while they find work, then - if this
 * poll or the one before found work - up to `spin` empty rounds more (a QD1 host's next
 * command is found in nanoseconds, not a trip through the Python worker loop; an idle
 * worker's wake-up stays one round per queue set), within `budget` commands.  With
 * coalescing one round only: Python accounts what it posted.
 *
 * While ring requests are out, empty rounds go on for up to `ring_spin_us` after the
 * last round that did something, `ring_slice_us` per call (the worker polls its other
 * slots in between).  A flowing file stream completes every few microseconds and its
 * host resubmits at once: a worker that slept between them (the eventfd wakes it ~40 us
 * later on the 2-vCPU VM) left the commands the host resubmitted unseen until the next
 * completion, and the disk had ~10 of 32 reads in flight instead of the ~20 fio keeps on the
 * same file.  A backend that stops completing ends the spin after ring_spin_us: the
 * worker then sleeps on the rings' eventfds as before. */
static int poll_rounds(struct vn_ctx *c, int budget);
static int reap_rings(struct vn_ctx *c, int *flags);

int vn_poll(struct vn_ctx *c, int budget)
{
    int r = poll_rounds(c, budget);
    for (uint32_t i = 0; i < c->nrings; i++)
        if (c->rings[i]->unsent)
            vn_ring_enter(c->rings[i]);     /* an enter the kernel refused (EAGAIN/EBUSY) */
    return r;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Some ring has requests in the kernel. */
static int rings_busy(const struct vn_ctx *c)
{
    for (uint32_t i = 0; i < c->nrings; i++)
        if (c->rings[i]->busy)
            return 1;
    return 0;
}

/* An empty round of a poll with ring requests out: spin on?  (See vn_poll.) */
static int ring_spin(struct vn_ctx *c, uint64_t *slice_end, uint32_t *probe)
{
    if (!c->ring_spin_us || c->coalesce || !rings_busy(c))
        return 0;
    if ((*probe)++ & 15)                /* the clock every 16th empty round (~1 us) */
        return 1;
    uint64_t now = now_ns();
    if (*slice_end == 0)
        *slice_end = now + 1000u * (uint64_t)c->ring_slice_us;
    if (now - c->last_work_ns >= 1000u * (uint64_t)c->ring_spin_us)
        return 0;
    if (now < *slice_end)
        return 1;
    /* End of a slice: let a task that woke on this core run now (the front-end, often
     * pinned here: a migration's stop arc, a vfio-user request).  The scheduler would
     * otherwise leave the spinning worker the rest of its own slice first (a scheduler
     * slice is ~1 ms); with nothing else runnable this returns at once. */
    sched_yield();
    return 0;
}

static int poll_rounds(struct vn_ctx *c, int budget)
{
    int flags = 0, done = 0, extra = 0;
    uint32_t n = c->nsq, start = 0, k = 0, spins = c->coalesce ? 0 : c->spin, rr = 0;
    uint32_t hot = c->hot, probe = 0;
    uint64_t slice_end = 0;
    c->nirq = 0;
    if (c->resume) {                    /* after Python ran the SQE we stopped at */
        c->resume = 0;
        start = c->rstart;
        k = c->rk;
    } else {
        if (!begin_round(c, &flags))
            return VN_NEED_POLL;
        if (n > 1)
            start = c->rr++ % n;
    }
    for (;;) {
        int before = done;
        for (uint32_t i = 0; i < c->ncq; i++)
            c->cq[i].posted = 0;
        if (c->nrings)                  /* ring completions first: their CQ room, their SQEs */
            done += reap_rings(c, &flags);
        for (; k < n; k++) {
            if (done >= budget) {
                flags |= VN_MORE;
                break;
            }
            done += run_sq(c, (start + k) % n, budget - done, &flags);
            if (flags & VN_NEED_SQE) {
                c->rstart = start;
                c->rk = k;
                break;
            }
        }
        flags |= end_round(c);
        for (uint32_t i = 0; i < c->nrings; i++)
            if (c->rings[i]->unsent)
                vn_ring_enter(c->rings[i]);     /* a refused enter: again, before spinning */
        if (extra && done == before)
            c->rr = rr;                 /* an empty extra round leaves the order as it was */
        if (flags & (VN_NEED_SQE | VN_NEED_POLL) || done >= budget || c->coalesce)
            break;
        if (done != before && c->ring_spin_us)
            c->last_work_ns = now_ns();
        if (done == before && !ring_spin(c, &slice_end, &probe) && (!(hot || done) || spins-- == 0))
            break;
        extra = 1;                      /* another round */
        rr = c->rr;
        flags &= ~VN_MORE;
        if (!begin_round(c, &flags)) {
            flags |= VN_NEED_POLL;      /* Python's poll reports it */
            break;
        }
        k = 0;
        start = n > 1 ? c->rr++ % n : 0;
    }
    c->hot = done != 0;
    return done | flags;
}

/* ---------------------------------------------------------------- ring completions */

static struct vn_sq *sq_by_qid(struct vn_ctx *c, uint32_t qid)
{
    for (uint32_t i = 0; i < c->nsq; i++)
        if (c->sq[i].qid == qid)
            return &c->sq[i];
    return NULL;
}

/* Count what the rings hold per SQ/CQ (a fresh context). */
void vn_ctx_count(struct vn_ctx *c)
{
    for (uint32_t i = 0; i < c->nsq; i++)
        c->sq[i].native = 0;
    for (uint32_t i = 0; i < c->ncq; i++)
        c->cq[i].native = 0;
    for (uint32_t i = 0; i < c->nrings; i++) {
        struct vn_ring *r = c->rings[i];
        for (uint32_t k = 0; k < r->depth; k++) {
            struct vn_sq *sq = r->req[k].state == VN_BUSY ? sq_by_qid(c, r->req[k].qid) : NULL;
            if (sq != NULL) {
                sq->native++;
                c->cq[sq->cq].native++;
            }
        }
    }
}

/* A ring request finished well: its data is marked dirty (it has landed), its CQE is
 * posted (SQHD = the SQ's head now, as QueueRunner.complete), its journal bit cleared
 * between the entry and the CQ tail (nvme.crashjournal). */
static void post_ring(struct vn_ctx *c, struct vn_sq *sq, const struct vn_req *q)
{
    struct vn_cq *cq = &c->cq[sq->cq];
    uint32_t *crec = cq->rec;
    uint32_t ctail = crec[CQ_TAIL], phase = crec[CQ_PHASE] & 1;
    if (q->opc == 2) {
        if (c->ndirty)
            for (uint32_t i = 0; i < q->nseg; i++)
                mark(c, q->gaddr[i], q->glen[i]);
        c->io[0]++;
        c->io[2] += q->len;
    } else if (q->opc == 1) {
        c->io[1]++;
        c->io[3] += q->len;
    }
    put_cqe(cq->ring + ctail * 4, sq->rec[SQ_HEAD] | (sq->qid << 16), q->cid, phase);
    sq->native--;
    cq->native--;
    junpark(sq->j, q->jslot, sq->parked == 0 && sq->native == 0);
    if (cq->posted++ == 0)
        cq->first = ctail;
    if (++ctail == cq->size) {
        ctail = 0;
        st(&crec[CQ_PHASE], phase ^ 1);
    }
    st(&crec[CQ_TAIL], ctail);
}

/* Reap every ring of the context: post what finished well, give failures (and requests
 * of SQs this context does not have) back to Python (VN_BACK), re-enter what went round
 * again.  Part of every poll round; vn_reap() alone between polls. */
static int reap_rings(struct vn_ctx *c, int *flags)
{
    int done = 0;
    for (uint32_t i = 0; i < c->nrings; i++) {
        struct vn_ring *r = c->rings[i];
        uint32_t head = *r->cq_head, tail = vn_ring_tail(r);
        if (head == tail)
            continue;
        r->unread = 1;                  /* each CQE also counted on the eventfd */
        struct vn_req *q;
        int out;
        while ((q = vn_ring_next(r, &head, tail, &out)) != NULL) {
            if (q->state == VN_BUSY) {
                struct vn_sq *sq = sq_by_qid(c, q->qid);
                if (out == 0 && sq != NULL && sq->j != NULL && sq->native &&
                    c->cq[sq->cq].rec[CQ_TAIL] < c->cq[sq->cq].size) {
                    post_ring(c, sq, q);
                    done++;
                } else {
                    if (sq != NULL && sq->native) {
                        sq->native--;   /* Python adopts it (its count moves there) */
                        c->cq[sq->cq].native--;
                    }
                    vn_ring_give_back(r, q, out);
                    *flags |= VN_BACK;
                }
            }
            vn_ring_put(r, q);
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        vn_ring_enter(r);
    }
    if (done)
        *flags |= VN_STALE;
    c->reaped += (uint32_t)done;
    return done;
}

/* Returns commands completed | VN_SIGNAL (Python signals) | VN_BACK | VN_STALE. */
int vn_reap(struct vn_ctx *c)
{
    int flags = 0;
    for (uint32_t i = 0; i < c->ncq; i++)
        c->cq[i].posted = 0;
    c->nirq = 0;
    int done = reap_rings(c, &flags);
    if (done)
        flags |= end_round(c);
    return done | flags;
}

/* Python's prepare_sleep: does SQ si's next SQE wait for room on a ring that is still
 * full?  Then a completion (its eventfd is in the sleep set) wakes the worker for it. */
int vn_sq_waits_for_ring(struct vn_ctx *c, uint32_t si)
{
    const struct vn_ring *r = si < c->nsq ? c->sq[si].full : NULL;
    return r != NULL && r->busy >= r->depth;
}
