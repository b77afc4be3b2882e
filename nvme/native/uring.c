/* vnvmed native data path: one io_uring ring per file namespace per worker slot.
 *
 * Theory of operation
 * -------------------
 * fastpath.c puts the Reads, Writes and Flushes it takes for a `file:` namespace on
 * that namespace's ring (vn_ring_get + vn_ring_queue + vn_ring_enter: each command is
 * entered as it is taken) and reaps the completions in vn_reap(), which posts the CQEs
 * with the same code as the synchronous commands.  This file is the ring itself, with raw system
 * calls (io_uring_setup/io_uring_enter/io_uring_register and mmap of the rings, as in
 * <linux/io_uring.h>), so no library is needed beyond the kernel headers that libc's
 * development package brings.
 *
 * Slots: at most `depth` requests are in flight (the namespace's queue-depth bound);
 * a slot is a struct vn_req and its index is the SQE's user_data.  The SQ ring has at
 * least `depth` entries and every busy request has at most one SQE queued, so the SQ
 * never fills; the CQ ring has twice that, so it never overflows.
 *
 * A completion is final (vn_ring_outcome >= 0) or the request goes round again: a
 * short transfer continues with the rest, EINVAL from the O_DIRECT fd (a guest buffer
 * that is not sector aligned) is retried on the buffered fd, EINTR/EAGAIN again - the
 * same rules as the Python engine (backends/uring.py).  Requests that Python must see
 * (a failure: Python maps the errno to a status and reports it; no context to post
 * with; an SQ going away) are copied to the `back` list and taken with vn_ring_take.
 *
 * The completion eventfd is registered with the ring; the worker sleeps on it.
 * Reaping by polling leaves its count behind: `unread` says so and vn_ring_settle()
 * drains it before the worker sleeps (as the Python engines' settle()).
 *
 * Deferred task work (kernels that take IORING_SETUP_DEFER_TASKRUN, 6.1+): a finished
 * O_DIRECT read is turned into a CQE by "task work" that must run in the worker.  By
 * default the kernel forces it in at once - an inter-processor interrupt into a worker
 * that is busy polling, a VM exit each on a virtual machine (~10 % of a spinning
 * worker's samples).  Deferred, it waits until the worker asks: the kernel raises
 * IORING_SQ_TASKRUN in the SQ ring's flags (one load per poll round here) and signals
 * the eventfd when the first one is queued, so a sleeping worker still wakes; every
 * reader of the CQ calls vn_ring_tail(), which runs what is queued first.  The ring
 * must then be entered by the task that made it, which is how the worker uses it.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fastpath.h"
#include "uring.h"

static inline uint32_t ld(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

struct vn_ring *vn_ring_open(int bfd, int dfd, uint32_t depth)
{
    if (depth == 0 || depth > 4096) {
        errno = EINVAL;
        return NULL;
    }
    struct vn_ring *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->fd = r->efd = -1;
    r->bfd = bfd;
    r->dfd = dfd;
    r->depth = depth;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
              IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = 2 * depth;
    int fd = (int)syscall(__NR_io_uring_setup, depth, &p);
    if (fd < 0 && errno == EINVAL) {    /* before 6.1: task work as it comes */
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = 2 * depth;
        fd = (int)syscall(__NR_io_uring_setup, depth, &p);
    }
    if (fd < 0)
        goto fail;
    r->defer = (p.flags & IORING_SETUP_DEFER_TASKRUN) != 0;
    r->fd = fd;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sq_map == MAP_FAILED || r->cq_map == MAP_FAILED || r->sqes == MAP_FAILED)
        goto fail;
    uint8_t *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (uint32_t *)(sq + p.sq_off.head);
    r->sq_tail = (uint32_t *)(sq + p.sq_off.tail);
    r->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    r->sq_array = (uint32_t *)(sq + p.sq_off.array);
    r->sq_flags = (uint32_t *)(sq + p.sq_off.flags);
    r->cq_head = (uint32_t *)(cq + p.cq_off.head);
    r->cq_tail = (uint32_t *)(cq + p.cq_off.tail);
    r->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->efd < 0 || syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &r->efd, 1) < 0)
        goto fail;
    r->req = calloc(depth, sizeof(*r->req));
    r->free = calloc(depth, sizeof(*r->free));
    r->back = calloc(depth, sizeof(*r->back));
    if (r->req == NULL || r->free == NULL || r->back == NULL)
        goto fail;
    for (uint32_t i = 0; i < depth; i++)
        r->free[i] = depth - 1 - i;
    r->nfree = r->back_cap = depth;
    return r;
fail:;
    int e = errno;
    if (r->sq_map == MAP_FAILED)
        r->sq_map = NULL;
    if (r->cq_map == MAP_FAILED)
        r->cq_map = NULL;
    if (r->sqes == MAP_FAILED)
        r->sqes = NULL;
    vn_ring_close(r);
    errno = e ? e : ENOMEM;
    return NULL;
}

/* Closing the ring fd makes the kernel cancel or finish what is still in flight (the
 * pages of an O_DIRECT transfer stay pinned until then).  Python takes those requests
 * back first (vn_ring_orphan) and answers them. */
void vn_ring_close(struct vn_ring *r)
{
    if (r == NULL)
        return;
    if (r->sqes != NULL)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map != NULL)
        munmap(r->cq_map, r->cq_len);
    if (r->sq_map != NULL)
        munmap(r->sq_map, r->sq_len);
    if (r->fd >= 0)
        close(r->fd);
    if (r->efd >= 0)
        close(r->efd);
    free(r->req);
    free(r->free);
    free(r->back);
    free(r);
}

int vn_ring_fileno(struct vn_ring *r) { return r->efd; }

/* Requests in flight: all of them (qid < 0) or those of one SQ. */
uint32_t vn_ring_busy(struct vn_ring *r, int32_t qid)
{
    if (qid < 0)
        return r->busy;
    uint32_t n = 0;
    for (uint32_t i = 0; i < r->depth; i++)
        n += r->req[i].state == VN_BUSY && r->req[i].qid == (uint32_t)qid;
    return n;
}

void vn_ring_drain(struct vn_ring *r)
{
    uint64_t v;
    r->unread = 0;
    if (read(r->efd, &v, sizeof(v)) < 0) {
        /* EAGAIN: nothing counted */
    }
}

/* About to sleep: clear the count of completions already reaped by polling; 1 if a
 * completion is waiting now (then do not sleep on the eventfd). */
int vn_ring_settle(struct vn_ring *r)
{
    if (r->unread)
        vn_ring_drain(r);
    /* After the drain: task work queued since then signals the eventfd again (the
     * kernel does on the first of a batch), and what was queued before shows here. */
    return r->busy && vn_ring_tail(r) != *r->cq_head;
}

/* The CQ's tail, after running the completions' deferred task work if the kernel says
 * some is queued (it runs at most a batch per enter: go on while the flag stays). */
uint32_t vn_ring_tail(struct vn_ring *r)
{
    for (int i = 0; r->defer && i < 16 && (ld(r->sq_flags) & IORING_SQ_TASKRUN); i++)
        if (syscall(__NR_io_uring_enter, r->fd, 0, 0, IORING_ENTER_GETEVENTS, NULL, 0) < 0 &&
            errno != EINTR)
            break;
    return ld(r->cq_tail);
}

struct vn_req *vn_ring_get(struct vn_ring *r)
{
    if (r->nfree == 0 || r->busy >= r->depth)
        return NULL;
    struct vn_req *q = &r->req[r->free[--r->nfree]];
    q->state = VN_BUSY;
    r->busy++;
    return q;
}

void vn_ring_put(struct vn_ring *r, struct vn_req *q)
{
    if (q->state == VN_FREE)
        return;
    q->state = VN_FREE;
    r->busy--;
    r->free[r->nfree++] = (uint32_t)(q - r->req);
}

/* One SQE for q (a new request or the rest of one); entered by vn_ring_enter. */
void vn_ring_queue(struct vn_ring *r, struct vn_req *q)
{
    uint32_t tail = *r->sq_tail, idx = tail & r->sq_mask;
    struct io_uring_sqe *e = &r->sqes[idx];
    memset(e, 0, sizeof(*e));
    if (q->opc == 0) {
        e->opcode = IORING_OP_FSYNC;
        e->fd = r->bfd;
        e->fsync_flags = IORING_FSYNC_DATASYNC;
    } else if (q->niov - q->first == 1) {
        /* One segment (a 4 KiB command, most of them): no iovec for the kernel to copy. */
        e->opcode = q->opc == 2 ? IORING_OP_READ : IORING_OP_WRITE;
        e->fd = q->fd;
        e->off = q->off;
        e->addr = (uint64_t)(uintptr_t)q->iov[q->first].iov_base;
        e->len = (uint32_t)q->iov[q->first].iov_len;
        e->rw_flags = q->rw_flags;
    } else {
        e->opcode = q->opc == 2 ? IORING_OP_READV : IORING_OP_WRITEV;
        e->fd = q->fd;
        e->off = q->off;
        e->addr = (uint64_t)(uintptr_t)(q->iov + q->first);
        e->len = q->niov - q->first;
        e->rw_flags = q->rw_flags;
    }
    e->user_data = (uint64_t)(q - r->req);
    r->sq_array[idx] = idx;
    st_rel(r->sq_tail, tail + 1);
    r->unsent++;
}

void vn_ring_enter(struct vn_ring *r)
{
    while (r->unsent) {
        long n = syscall(__NR_io_uring_enter, r->fd, r->unsent, 0, 0, NULL, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;                     /* EAGAIN/EBUSY: the next enter takes them */
        }
        r->unsent -= (uint32_t)n < r->unsent ? (uint32_t)n : r->unsent;
        if (n == 0)
            return;
    }
}

/* What one CQE means for q: -1 it went round again, else 0 (done) or an errno. */
int vn_ring_outcome(struct vn_ring *r, struct vn_req *q, int32_t res)
{
    if (q->state == VN_ORPHAN)
        return res < 0 ? -res : 0;      /* Python answered it already: just free the slot */
    if (res < 0) {
        int err = -res;
        if (err == EINVAL && q->opc != 0 && r->dfd >= 0 && q->fd == r->dfd) {
            q->fd = r->bfd;             /* misaligned for O_DIRECT: buffered retry */
            vn_ring_queue(r, q);
            return -1;
        }
        if (err == EINTR || err == EAGAIN) {
            vn_ring_queue(r, q);
            return -1;
        }
        return err;
    }
    if (q->opc == 0 || (uint64_t)res >= q->left)
        return 0;
    if (res == 0)
        return EIO;                     /* EOF inside the namespace: the file shrank */
    uint64_t n = (uint64_t)res;         /* a short transfer: the rest */
    q->off += n;
    q->left -= n;
    while (n) {
        struct iovec *v = &q->iov[q->first];
        if (n >= v->iov_len) {
            n -= v->iov_len;
            q->first++;
        } else {
            v->iov_base = (uint8_t *)v->iov_base + n;
            v->iov_len -= n;
            n = 0;
        }
    }
    vn_ring_queue(r, q);
    return -1;
}

/* The next request a CQE in [*head, tail) finished, with its outcome in *out; NULL at
 * the end.  Requests that went round again (vn_ring_outcome < 0) are passed over. */
struct vn_req *vn_ring_next(struct vn_ring *r, uint32_t *head, uint32_t tail, int *out)
{
    while (*head != tail) {
        struct io_uring_cqe *e = &r->cqes[*head & r->cq_mask];
        struct vn_req *q = &r->req[e->user_data % r->depth];
        int32_t res = e->res;
        (*head)++;
        int o = vn_ring_outcome(r, q, res);
        if (o >= 0) {
            *out = o;
            return q;
        }
    }
    return NULL;
}

/* Copy q to the back list for Python (err: errno, 0, or -1 = still running). */
void vn_ring_give_back(struct vn_ring *r, struct vn_req *q, int err)
{
    if (r->nback == r->back_cap) {      /* Python takes them after each call: rare */
        struct vn_back *nb = realloc(r->back, 2 * r->back_cap * sizeof(*nb));
        if (nb == NULL)
            abort();                    /* never lose a command silently */
        r->back = nb;
        r->back_cap *= 2;
    }
    struct vn_back *b = &r->back[r->nback++];
    memset(b, 0, sizeof(*b));
    b->qid = q->qid;
    b->cid = q->cid;
    b->opc = q->opc;
    b->nsid = q->nsid;
    b->jslot = q->jslot;
    b->err = err;
    b->slba = q->slba;
    b->nseg = q->nseg;
    for (uint32_t i = 0; i < q->nseg && i < 32; i++) {
        b->addr[i] = q->gaddr[i];
        b->len[i] = q->glen[i];
    }
}

/* No context to post with (the Python path runs this configuration): every finished
 * request goes back to Python.  Returns how many. */
int vn_ring_reap_raw(struct vn_ring *r)
{
    uint32_t head = *r->cq_head, tail = vn_ring_tail(r);
    int n = 0, out;
    struct vn_req *q;
    while ((q = vn_ring_next(r, &head, tail, &out)) != NULL) {
        if (q->state == VN_BUSY) {
            vn_ring_give_back(r, q, out);
            n++;
        }
        vn_ring_put(r, q);
    }
    st_rel(r->cq_head, head);
    if (n)
        r->unread = 1;
    vn_ring_enter(r);
    return n;
}

/* The SQ qid (or every SQ: qid < 0) goes away with requests still in flight: they go
 * back to Python (err -1) and their completions, when they come, only free the slot. */
uint32_t vn_ring_orphan(struct vn_ring *r, int32_t qid)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < r->depth; i++) {
        struct vn_req *q = &r->req[i];
        if (q->state == VN_BUSY && (qid < 0 || q->qid == (uint32_t)qid)) {
            vn_ring_give_back(r, q, -1);
            q->state = VN_ORPHAN;
            n++;
        }
    }
    return n;
}

int vn_ring_take(struct vn_ring *r, struct vn_back *out)
{
    if (r->nback == 0)
        return 0;
    *out = r->back[0];
    r->nback--;
    memmove(r->back, r->back + 1, r->nback * sizeof(*r->back));
    return 1;
}
