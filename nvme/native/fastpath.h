/* vnvmed native data path: the context shared with Python (cffi cdef reads this file).
 *
 * Python (nvme/native/runner.py) fills a vn_ctx from the QueueRunner's queues, the
 * guest memory map, the namespaces and the doorbell pages, and calls vn_poll() once per
 * poll.  Plain numbers only (cffi's cdef parser): no macros are used in the layout.
 * File namespaces (kind 3) go to an io_uring ring of their own (uring.c), opaque here. */

struct vn_ring;

struct vn_region {              /* one DMA region of guest memory */
    uint64_t iova, size;
    uint8_t *host;              /* NULL: mapped without fd (Python's slow path) */
    uint32_t r, w;
};

struct vn_dirty {               /* a dirty-page byte map (SEAMS S3): byte k = page first+k */
    uint64_t iova, size, first;
    uint8_t *bm;
};

struct vn_ns {                  /* indexed by NSID; kind 0: not served natively */
    uint8_t *data;              /* kind 1 (ram): the backend's memory */
    struct vn_ring *ring;       /* kind 3 (file): its ring (submit, reap in C) */
    uint64_t blocks;
    uint32_t shift, kind, ro, pad;
};

struct vn_cq {
    uint32_t *rec;              /* queue-table record (nvme/qtable.py) */
    uint32_t *ring;             /* the CQ's entries in guest memory */
    uint64_t base;              /* guest address of the ring (dirty marks) */
    uint32_t qid, size, dbi, inflight, posted, ien, iv, first;
    int32_t irqfd, pad;         /* eventfd of the CQ's vector, -1: Python signals it */
    uint32_t native, pad2;      /* commands in flight on rings that will post here */
};

struct vn_sq {
    uint32_t *rec;
    uint32_t *ring;
    uint32_t qid, size, dbi, cq, parked, native;  /* parked: Python's; native: on rings */
    uint32_t *j;                /* the SQ's crash journal (nvme.crashjournal), or NULL */
    struct vn_ring *full;       /* its next SQE waits for room on this ring, or NULL */
};

struct vn_ctx {
    uint32_t *db;               /* the doorbell words (BAR0 + 0x1000) */
    uint32_t *sh_db, *sh_ei;    /* shadow doorbell / EventIdx pages, or NULL */
    uint64_t ei_iova;           /* guest address of the EventIdx page (dirty marks) */
    uint64_t mdts;              /* bytes, 0 = no limit */
    uint32_t nsq, ncq, nreg, nns, nwin, ndirty, lazy, coalesce;
    uint32_t rr, stop_sq, nirq, resume;  /* resume: go on with the round stop_sq was in */
    uint32_t rstart, rk;        /* that round's first SQ and position (vn_poll's own) */
    uint32_t spin, hot;         /* empty rounds vn_poll may add; did the last poll work */
    uint64_t io[4];             /* reads, writes, bytes read, bytes written */
    uint32_t irq[64];           /* vectors to signal after this poll */
    uint32_t tails[64];         /* SQ tails read at the start of the round (vn_poll's own) */
    struct vn_sq sq[64];
    struct vn_cq cq[64];
    struct vn_region reg[64];
    struct vn_ns ns[64];
    uint64_t win[32];           /* message-write windows: [start, end) pairs */
    struct vn_dirty dirty[64];
    struct vn_ring *rings[64];  /* the distinct rings of ns[] (reaped by vn_reap) */
    uint32_t nrings, conflict;  /* conflict: the SQE stopped at reuses a CID in flight */
    uint32_t newp, reaped;      /* commands put on rings / completed from rings (Python's) */
    uint32_t ring_spin_us;      /* with ring requests out: spin up to this after the last work */
    uint32_t ring_slice_us;     /* ... at most this long per vn_poll (the worker's other slots) */
    uint64_t last_work_ns;      /* CLOCK_MONOTONIC of the last round that did something */
};

struct vn_back {                /* a request finished for Python (vn_ring_take) */
    uint32_t qid, cid, opc, nsid, nseg;
    int32_t jslot, err, pad;    /* err: errno, 0 done, -1 still running (SQ going away) */
    uint64_t slba;
    uint64_t addr[32], len[32]; /* guest ranges (dirty marks of a read) */
};

int vn_poll(struct vn_ctx *c, int budget);
int vn_reap(struct vn_ctx *c);
void vn_ctx_count(struct vn_ctx *c);
int vn_sq_waits_for_ring(struct vn_ctx *c, uint32_t si);
struct vn_ring *vn_ring_open(int bfd, int dfd, uint32_t depth);
void vn_ring_close(struct vn_ring *r);
int vn_ring_fileno(struct vn_ring *r);
uint32_t vn_ring_busy(struct vn_ring *r, int32_t qid);
int vn_ring_settle(struct vn_ring *r);
void vn_ring_drain(struct vn_ring *r);
int vn_ring_reap_raw(struct vn_ring *r);
uint32_t vn_ring_orphan(struct vn_ring *r, int32_t qid);
int vn_ring_take(struct vn_ring *r, struct vn_back *out);
const char *vn_source_id(void);
