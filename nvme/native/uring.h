/* vnvmed native data path: io_uring rings for file namespaces (uring.c), internal.
 *
 * Not parsed by cffi: Python sees a ring only through the functions declared in
 * fastpath.h (struct vn_ring is opaque there). */
#ifndef VN_URING_H
#define VN_URING_H

#include <stdint.h>
#include <sys/uio.h>
#include <linux/io_uring.h>

#define VN_MAXSEG 32                    /* iovecs per request; more: the Python path */

enum { VN_FREE = 0, VN_BUSY = 1, VN_ORPHAN = 2 };

/* One NVMe command in flight on a ring (a slot; user_data = its index). */
struct vn_req {
    uint32_t state, qid, cid, opc, nsid, nseg, first, niov;
    int32_t jslot, fd;                  /* crash-journal slot; the fd it goes to */
    uint32_t rw_flags, pad;
    uint64_t off, left, slba, len;      /* file offset / bytes still to move; for stats */
    struct iovec iov[VN_MAXSEG];        /* host views; [first, niov) still to move */
    uint64_t gaddr[VN_MAXSEG], glen[VN_MAXSEG];   /* guest ranges (dirty marks) */
};

struct vn_ring {
    int fd, efd, bfd, dfd;              /* ring, completion eventfd, file, file O_DIRECT (-1) */
    uint32_t depth, busy, unsent, unread;
    uint32_t defer, pad;                /* set up with DEFER_TASKRUN (see uring.c) */
    uint32_t *sq_head, *sq_tail, *sq_array, sq_mask, *sq_flags;
    uint32_t *cq_head, *cq_tail, cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
    struct vn_req *req;                 /* depth slots */
    uint32_t *free, nfree;
    struct vn_back *back;               /* finished, for Python (errors, no context) */
    uint32_t nback, back_cap;
};

struct vn_req *vn_ring_get(struct vn_ring *r);
void vn_ring_queue(struct vn_ring *r, struct vn_req *q);
void vn_ring_put(struct vn_ring *r, struct vn_req *q);
void vn_ring_give_back(struct vn_ring *r, struct vn_req *q, int err);
int vn_ring_outcome(struct vn_ring *r, struct vn_req *q, int32_t res);
struct vn_req *vn_ring_next(struct vn_ring *r, uint32_t *head, uint32_t tail, int *out);
void vn_ring_enter(struct vn_ring *r);
uint32_t vn_ring_tail(struct vn_ring *r);

#endif
