/* vnvmed native data path: the context shared with Python (cffi cdef reads this file).
 *
 * Python (nvme/native/runner.py) fills a vn_ctx from the QueueRunner's queues, the
 * guest memory map, the namespaces and the doorbell pages, and calls vn_poll() once per
 * poll.  Plain numbers only (cffi's cdef parser): no macros are used in the layout. */

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
    uint64_t blocks;
    uint32_t shift, kind, ro, pad;
};

struct vn_cq {
    uint32_t *rec;              /* queue-table record (nvme/qtable.py) */
    uint32_t *ring;             /* the CQ's entries in guest memory */
    uint64_t base;              /* guest address of the ring (dirty marks) */
    uint32_t qid, size, dbi, inflight, posted, ien, iv, first;
    int32_t irqfd, pad;         /* eventfd of the CQ's vector, -1: Python signals it */
};

struct vn_sq {
    uint32_t *rec;
    uint32_t *ring;
    uint32_t qid, size, dbi, cq, parked, pad;
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
};

int vn_poll(struct vn_ctx *c, int budget);
const char *vn_source_id(void);
