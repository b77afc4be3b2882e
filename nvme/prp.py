"""PRP walking: turn a command's PRP1/PRP2 into data memoryviews (NVMe Base §4.3).

Theory of operation
-------------------
A transfer of `length` bytes starts at PRP1, which may carry a dword-aligned offset
into its page; the first chunk runs to the end of that page.  If bytes remain:

* remaining <= one page: PRP2 is the data pointer of the second (last) page and must
  have offset 0;
* otherwise PRP2 points at a PRP *list* (qword aligned, may start mid-page).  Every
  list entry is the page-aligned address of one more data page.  A list occupies the
  rest of its page; when more entries are needed than fit, the last slot of that page
  is not data but a pointer to the next list page (page aligned).

List pages are always read through read-only views: firmware (SeaBIOS) may keep them
in read-only memory, and the device never writes them.  Data views are writable
only when the device writes guest memory (`to_guest=True`, i.e. Read).

Physically contiguous pages are coalesced into one view (fewer iovecs for preadv);
if a coalesced run straddles two mappings it is split back into pages.

Errors: misaligned entries -> INVALID_PRP_OFFSET; any DmaFault -> DATA_TRANSFER_ERROR;
`NeedsMessageDma` propagates untouched (the caller may retry on the slow path).
`map_dptr` is the PSDT dispatcher shared with the admin command set.
"""
from __future__ import annotations

from .errors import CommandError
from .memory import DmaFault, GuestMemory, NeedsMessageDma
from .status import Status

# A guest can chain list pages forever (a list whose chain pointer points to itself
# only loops if entries remain, which `length` bounds); the entry count bounds it too.


def _list_entries(mem: GuestMemory, addr: int, n: int) -> memoryview:
    """n 64-bit PRP entries at addr, read-only, as a 'Q' view."""
    try:
        return mem.view(addr, n * 8, write=False).cast("Q")
    except NeedsMessageDma:
        raise
    except DmaFault as e:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"PRP list: {e}") from None


def prp_pages(mem: GuestMemory, prp1: int, prp2: int, length: int,
              page_size: int = 4096) -> list[tuple[int, int]]:
    """The (guest address, length) runs the PRPs describe, coalesced, in order."""
    if length <= 0:
        return []
    mask = page_size - 1
    if prp1 & 3:
        raise CommandError(Status.INVALID_PRP_OFFSET, "PRP1 not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    runs: list[list[int]] = [[prp1, first]]
    remaining = length - first
    if remaining == 0:
        return [(a, n) for a, n in runs]
    if remaining <= page_size:
        if prp2 & mask:
            raise CommandError(Status.INVALID_PRP_OFFSET, "PRP2 data pointer has an offset")
        _append(runs, prp2, remaining)
        return [(a, n) for a, n in runs]
    # PRP2 is a list pointer.
    if prp2 & 7:
        raise CommandError(Status.INVALID_PRP_OFFSET, "PRP list pointer not qword aligned")
    list_addr = prp2
    npages = (remaining + mask) // page_size
    while npages:
        slots = (page_size - (list_addr & mask)) // 8
        chained = npages > slots
        take = slots - 1 if chained else npages
        ents = _list_entries(mem, list_addr, slots if chained else take)
        body = ents[:take] if chained else ents
        # A list that starts in the last qword of its page has room for nothing but
        # the chain pointer (take == 0): follow it.
        e0 = body[0] if take else 0
        # Contiguity of the whole page of entries in one big-int comparison (C
        # speed): the list is little-endian qwords, so it equals e0*R + page*S with
        # R = sum 2^(64i) and S = sum i*2^(64i) exactly when entry i == e0 + i*page
        # (an entry past 2^64 would carry out of the top qword: never equal).
        r_s = _rs(take, page_size)
        if not take:
            pass
        elif not e0 & mask and int.from_bytes(body, "little") == e0 * r_s[0] + r_s[1]:
            # The common case (one contiguous buffer): the whole page of entries is one run.
            n = take * page_size if remaining > take * page_size else remaining
            _append(runs, e0, n)
            remaining -= n
        else:
            vals = ents.tolist()
            last = runs[-1]
            for ent in vals[:take]:
                if ent & mask:
                    raise CommandError(Status.INVALID_PRP_OFFSET, f"PRP entry {ent:#x} has an offset")
                n = page_size if remaining > page_size else remaining
                if last[0] + last[1] == ent:
                    last[1] += n
                else:
                    last = [ent, n]
                    runs.append(last)
                remaining -= n
        npages -= take
        if chained:
            nxt = ents[slots - 1]
            if nxt & mask:
                raise CommandError(Status.INVALID_PRP_OFFSET, "chained PRP list pointer has an offset")
            list_addr = nxt
        ents.release()
    return [(a, n) for a, n in runs]


_RS: dict[tuple[int, int], tuple[int, int]] = {}


def _rs(take: int, page_size: int) -> tuple[int, int]:
    r_s = _RS.get((take, page_size))
    if r_s is None:
        r_s = _RS[(take, page_size)] = (sum(1 << (64 * i) for i in range(take)),
                                        page_size * sum(i << (64 * i) for i in range(take)))
    return r_s


def list_is_contiguous(mem: GuestMemory, prp2: int, first_page: int, npages: int,
                       page_size: int = 4096) -> bool:
    """True if the PRP list at prp2 is exactly npages entries first_page, +page, ...

    The data-path fast check for "one physically contiguous buffer" (one view, one
    copy).  It only answers yes for a well-formed, unchained list (qword aligned,
    all entries in the list's page) it could read; anything else - including a list
    it cannot map - is False, and the caller's general path (prp_pages) reports the
    proper error.  `NeedsMessageDma` propagates as everywhere else.
    """
    mask = page_size - 1
    if prp2 & 7 or npages <= 0 or npages > (page_size - (prp2 & mask)) >> 3 or first_page & mask:
        return False
    try:
        raw = mem.view(prp2, npages << 3, write=False)
    except NeedsMessageDma:
        raise
    except DmaFault:
        return False
    r, s = _rs(npages, page_size)
    # Same big-int identity as in prp_pages: entry i == first_page + i*page for all i.
    return int.from_bytes(raw, "little") == first_page * r + s


def _append(runs: list[list[int]], addr: int, n: int) -> None:
    last = runs[-1]
    if last[0] + last[1] == addr:
        last[1] += n
    else:
        runs.append([addr, n])


def views_for_runs(mem: GuestMemory, runs: list[tuple[int, int]], to_guest: bool,
                   page_size: int = 4096) -> list[memoryview]:
    """Views for (addr, len) runs; a run that straddles mappings is split per page."""
    out: list[memoryview] = []
    for addr, n in runs:
        try:
            out.append(mem.view(addr, n, write=to_guest))
            continue
        except NeedsMessageDma:
            raise
        except DmaFault:
            if n <= page_size:
                raise CommandError(Status.DATA_TRANSFER_ERROR, f"data {addr:#x}+{n:#x} not accessible") from None
        # Coalesced run crossing a mapping boundary: retry page by page.
        end = addr + n
        a = addr
        while a < end:
            step = min(end - a, page_size - (a & (page_size - 1)))
            try:
                out.append(mem.view(a, step, write=to_guest))
            except NeedsMessageDma:
                raise
            except DmaFault as e:
                raise CommandError(Status.DATA_TRANSFER_ERROR, str(e)) from None
            a += step
    return out


def map_prp(mem: GuestMemory, prp1: int, prp2: int, length: int, to_guest: bool,
            page_size: int = 4096) -> list[memoryview]:
    """Data views for a PRP-described transfer of `length` bytes."""
    return views_for_runs(mem, prp_pages(mem, prp1, prp2, length, page_size), to_guest, page_size)


def map_dptr(mem: GuestMemory, dw: memoryview, length: int, to_guest: bool,
             page_size: int = 4096) -> list[memoryview]:
    """Data views for the DPTR of an SQE given as 16 dwords (memoryview cast 'I').

    PSDT (CDW0[15:14]): 00 PRP, 01/10 SGL for data, 11 reserved -> INVALID_FIELD.
    """
    psdt = (dw[0] >> 14) & 3
    if psdt == 0:
        return map_prp(mem, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), length, to_guest, page_size)
    if psdt == 3:
        raise CommandError(Status.INVALID_FIELD, "reserved PSDT")
    from .sgl import map_sgl  # local: sgl is the rarer path
    return map_sgl(mem, dw[6] | (dw[7] << 32), dw[8], dw[9] >> 24, length, to_guest)
