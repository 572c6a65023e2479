//! The guest: its memory layout (GDT, page tables, parameters, code, buffer)
//! and its program, machine code of the project's own built with
//! [`asm`](super::asm). It runs in 64-bit ring 3 only: loads, stores,
//! `imul`, `rdtsc` and `out` (RFLAGS.IOPL = 3), so no guest kernel code runs
//! (ring-0 code is emulated and very slow on this nested KVM).
//!
//! What it does: fill its buffer with a pattern (every qword at guest
//! address `a` holds `a * K`), say so on [`PORT_READY`], then loop forever:
//! every millisecond of TSC (the host puts the ticks per ms in the
//! parameter page; the next heartbeat is due 1 ms after the last one) it writes a heartbeat — its counter and TSC into the
//! parameter page, the counter to [`PORT_HEARTBEAT`] — and dirties as many
//! buffer pages as the host asks per elapsed millisecond (round robin, a
//! batch at a time, stopping early when the next heartbeat is due; a dirtied page gets a new
//! stamp in word 0 and `stamp ^ D(page)` in word 1, so the pattern stays
//! checkable); when the host sets the command word, it checks its whole
//! buffer and sends the number of wrong qwords to [`PORT_CHECK`]; when the
//! host puts an address in [`P_TOUCH`], it rewrites that qword; then it
//! tells [`PORT_IDLE`] how long it has nothing to do, so the VMM can sleep
//! the vCPU thread as KVM sleeps a halted vCPU.

use super::asm::{Asm, Cc, M, R};

/// Guest page size (4 KiB; the guest maps 2 MiB pages).
pub const PAGE: u64 = 4096;
/// The GDT (and the TSS after it) in guest physical memory.
pub const GDT_AT: u64 = 0x0;
/// The TSS (never used: no privilege change happens; VM entry wants one).
pub const TSS_AT: u64 = 0x80;
/// PML4; the PDPT follows at +0x1000 and the page directories at +0x2000.
pub const PML4_AT: u64 = 0x1000;
/// The parameter page shared by host and guest.
pub const PARAMS_AT: u64 = 0x8000;
/// Where the code starts.
pub const CODE_AT: u64 = 0x10000;
/// Top of the (unused) stack.
pub const STACK_TOP: u64 = 0x30000;
/// Where the buffer starts (the rest of guest memory is buffer).
pub const BUFFER_AT: u64 = 0x20_0000;
/// Largest guest: four page directories of 2 MiB pages.
pub const MAX_BYTES: u64 = 4 << 30;

/// Parameter page offsets (qwords): written by the host.
pub const P_TSC_PER_MS: u64 = 0x00;
/// Pages to dirty per millisecond.
pub const P_DIRTY_PER_MS: u64 = 0x08;
/// First buffer byte (guest address).
pub const P_BUF_START: u64 = 0x10;
/// Buffer length in pages.
pub const P_BUF_PAGES: u64 = 0x18;
/// Command: non-zero asks the guest to check its buffer (it clears it).
pub const P_COMMAND: u64 = 0x20;
/// Command: a guest address (8-aligned, non-zero) whose qword the guest
/// rewrites with its own value, then clears this word and says so on
/// [`PORT_TOUCHED`]: one guest write to one page, contents unchanged (the
/// dirty-log conformance tests).
pub const P_TOUCH: u64 = 0x28;
/// Written by the guest: the last heartbeat's counter.
pub const P_HB_COUNT: u64 = 0x40;
/// Written by the guest: the last heartbeat's TSC.
pub const P_HB_TSC: u64 = 0x48;
/// Written by the guest: pages dirtied so far (its stamp).
pub const P_DIRTIED: u64 = 0x50;

/// Port: the buffer is filled; the loop starts.
pub const PORT_READY: u16 = 0x10;
/// Port: a heartbeat (eax = counter, low 32 bits).
pub const PORT_HEARTBEAT: u16 = 0x11;
/// Port: the buffer check's result (eax = wrong qwords; 0 = passed).
pub const PORT_CHECK: u16 = 0x12;
/// Port: nothing to do for eax TSC ticks (until the next heartbeat).
pub const PORT_IDLE: u16 = 0x13;
/// Port: the qword of [`P_TOUCH`] was rewritten.
pub const PORT_TOUCHED: u16 = 0x14;

/// The pattern multiplier (odd, so `a * K` differs for every address).
pub const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// The expected qword at guest address `a` of a page never dirtied.
#[must_use]
pub fn pattern(a: u64) -> u64 {
    a.wrapping_mul(K)
}

fn abs(off: u64) -> M {
    M::Abs(u32::try_from(PARAMS_AT + off).expect("parameter page below 4 GiB"))
}

/// The guest program (placed at [`CODE_AT`]).
#[must_use]
pub fn program() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(R::R15, K);
    // Fill: every qword a of the buffer = a * K.
    a.load(R::Rsi, abs(P_BUF_START));
    a.load(R::Rcx, abs(P_BUF_PAGES));
    a.shl(R::Rcx, 9);
    a.label("fill");
    a.mov(R::Rax, R::Rsi);
    a.imul(R::Rax, R::R15);
    a.store(M::Base(R::Rsi, 0), R::Rax);
    a.add_imm(R::Rsi, 8);
    a.dec(R::Rcx);
    a.jcc(Cc::Ne, "fill");
    a.mov_edx(u32::from(PORT_READY));
    a.out_dx_eax();
    // r12 = next heartbeat's TSC, r13 = heartbeat counter, r14 = dirty
    // cursor (page index), r10 = stamp (pages dirtied).
    a.xor(R::R13, R::R13);
    a.xor(R::R14, R::R14);
    a.xor(R::R10, R::R10);
    a.xor(R::R12, R::R12);
    // r11 = the dirty clock: when the next batch is due.
    a.rdtsc();
    a.shl(R::Rdx, 32);
    a.or(R::Rax, R::Rdx);
    a.mov(R::R11, R::Rax);
    a.label("main");
    a.rdtsc();
    a.shl(R::Rdx, 32);
    a.or(R::Rax, R::Rdx);
    a.cmp(R::Rax, R::R12);
    a.jcc(Cc::B, "main");
    // A tick: the next one a millisecond of TSC from now (so consecutive
    // heartbeats are never closer than 1 ms; a paused guest beats at once).
    a.mov(R::Rbx, R::Rax);
    a.mov(R::R12, R::Rbx);
    a.add_mem(R::R12, abs(P_TSC_PER_MS));
    a.inc(R::R13);
    a.store(abs(P_HB_COUNT), R::R13);
    a.store(abs(P_HB_TSC), R::Rbx);
    a.mov(R::Rax, R::R13);
    a.mov_edx(u32::from(PORT_HEARTBEAT));
    a.out_dx_eax();
    // Dirty one batch per millisecond elapsed on the dirty clock (r11), so
    // the rate holds when heartbeats come late; far behind (paused), at most
    // 64 batches, then the clock restarts from now.
    a.xor(R::R9, R::R9);
    a.label("dirty_tick");
    a.cmp(R::R11, R::Rbx);
    a.jcc(Cc::A, "dirty_caught_up");
    a.add_mem(R::R11, abs(P_TSC_PER_MS));
    dirty(&mut a);
    // A heartbeat that is due comes first, as a timer interrupt would: the
    // rest of the catch-up waits for the next tick (the dirty clock keeps
    // the rate), so slow writes (tracked pages fault) delay dirtying, not
    // heartbeats.
    a.rdtsc();
    a.shl(R::Rdx, 32);
    a.or(R::Rax, R::Rdx);
    a.cmp(R::Rax, R::R12);
    a.jcc(Cc::Ae, "dirty_caught_up");
    a.inc(R::R9);
    a.cmp_imm(R::R9, 64);
    a.jcc(Cc::B, "dirty_tick");
    a.mov(R::R11, R::Rbx);
    a.add_mem(R::R11, abs(P_TSC_PER_MS));
    a.label("dirty_caught_up");
    check(&mut a);
    touch(&mut a);
    // Idle until the next heartbeat: tell the host how many TSC ticks are
    // left (the host may sleep the vCPU thread that long, as KVM does a
    // halted vCPU); then spin on the TSC for the rest.
    a.rdtsc();
    a.shl(R::Rdx, 32);
    a.or(R::Rax, R::Rdx);
    a.cmp(R::Rax, R::R12);
    a.jcc(Cc::Ae, "main");
    a.mov(R::Rcx, R::R12);
    a.sub(R::Rcx, R::Rax);
    a.mov(R::Rax, R::Rcx);
    a.mov_edx(u32::from(PORT_IDLE));
    a.out_dx_eax();
    a.jmp("main");
    a.finish()
}

/// Dirty `[P_DIRTY_PER_MS]` pages round robin (one batch), then fall through.
fn dirty(a: &mut Asm) {
    a.load(R::Rcx, abs(P_DIRTY_PER_MS));
    a.test(R::Rcx, R::Rcx);
    a.jcc(Cc::E, "dirty_done");
    a.label("dirty");
    a.mov(R::Rsi, R::R14);
    a.shl(R::Rsi, 12);
    a.add_mem(R::Rsi, abs(P_BUF_START));
    a.inc(R::R10);
    a.store(M::Base(R::Rsi, 0), R::R10);
    // word 1 = stamp ^ D(page), D(p) = p*K ^ (p+8)*K.
    a.lea(R::Rdi, M::Base(R::Rsi, 8));
    a.imul(R::Rdi, R::R15);
    a.mov(R::Rax, R::Rsi);
    a.imul(R::Rax, R::R15);
    a.xor(R::Rdi, R::Rax);
    a.xor(R::Rdi, R::R10);
    a.store(M::Base(R::Rsi, 8), R::Rdi);
    a.inc(R::R14);
    a.cmp_mem(R::R14, abs(P_BUF_PAGES));
    a.jcc(Cc::B, "no_wrap");
    a.xor(R::R14, R::R14);
    a.label("no_wrap");
    a.dec(R::Rcx);
    a.jcc(Cc::Ne, "dirty");
    a.store(abs(P_DIRTIED), R::R10);
    a.label("dirty_done");
}

/// If the command word is set: clear it, check the buffer, report to
/// [`PORT_CHECK`]; then fall through.
fn check(a: &mut Asm) {
    a.load(R::Rax, abs(P_COMMAND));
    a.test(R::Rax, R::Rax);
    a.jcc(Cc::E, "check_done");
    a.store_imm(abs(P_COMMAND), 0);
    a.load(R::Rsi, abs(P_BUF_START));
    a.load(R::Rcx, abs(P_BUF_PAGES));
    a.xor(R::R8, R::R8);
    a.label("check_page");
    // word 1 ^ word 0 == D(page)
    a.lea(R::Rdi, M::Base(R::Rsi, 8));
    a.imul(R::Rdi, R::R15);
    a.mov(R::Rax, R::Rsi);
    a.imul(R::Rax, R::R15);
    a.xor(R::Rdi, R::Rax);
    a.load(R::Rax, M::Base(R::Rsi, 0));
    a.xor(R::Rdi, R::Rax);
    a.cmp_mem(R::Rdi, M::Base(R::Rsi, 8));
    a.jcc(Cc::E, "head_ok");
    a.inc(R::R8);
    a.label("head_ok");
    // words 2..511 == their address * K
    a.lea(R::Rdi, M::Base(R::Rsi, 16));
    a.mov_imm(R::R9, 510);
    a.label("check_word");
    a.mov(R::Rax, R::Rdi);
    a.imul(R::Rax, R::R15);
    a.cmp_mem(R::Rax, M::Base(R::Rdi, 0));
    a.jcc(Cc::E, "word_ok");
    a.inc(R::R8);
    a.label("word_ok");
    a.add_imm(R::Rdi, 8);
    a.dec(R::R9);
    a.jcc(Cc::Ne, "check_word");
    a.add_imm(R::Rsi, 4096);
    a.dec(R::Rcx);
    a.jcc(Cc::Ne, "check_page");
    a.mov(R::Rax, R::R8);
    a.mov_edx(u32::from(PORT_CHECK));
    a.out_dx_eax();
    a.label("check_done");
}

/// If the touch word holds an address: rewrite its qword, clear the word,
/// report to [`PORT_TOUCHED`]; then fall through.
fn touch(a: &mut Asm) {
    a.load(R::Rsi, abs(P_TOUCH));
    a.test(R::Rsi, R::Rsi);
    a.jcc(Cc::E, "touch_done");
    a.load(R::Rax, M::Base(R::Rsi, 0));
    a.store(M::Base(R::Rsi, 0), R::Rax);
    a.store_imm(abs(P_TOUCH), 0);
    a.mov_edx(u32::from(PORT_TOUCHED));
    a.out_dx_eax();
    a.label("touch_done");
}

/// A guest that executes `hlt` in ring 3: a #GP with no IDT, so a triple
/// fault (the bad-guest test).
#[must_use]
pub fn halting_program() -> Vec<u8> {
    let mut a = Asm::new();
    a.hlt();
    a.finish()
}

/// The page tables for an identity map of `bytes` with 2 MiB user pages:
/// (guest address, bytes) pairs to write.
#[must_use]
pub fn page_tables(bytes: u64) -> Vec<(u64, Vec<u8>)> {
    const PRESENT_RW_USER: u64 = 0b111;
    const HUGE: u64 = 1 << 7;
    let pdpt = PML4_AT + PAGE;
    let pds = PML4_AT + 2 * PAGE;
    let mut out = vec![(PML4_AT, (pdpt | PRESENT_RW_USER).to_le_bytes().to_vec())];
    let dirs = bytes.div_ceil(1 << 30);
    let mut pdpt_bytes = Vec::new();
    for d in 0..dirs {
        pdpt_bytes.extend_from_slice(&((pds + d * PAGE) | PRESENT_RW_USER).to_le_bytes());
    }
    out.push((pdpt, pdpt_bytes));
    let mut pd_bytes = Vec::new();
    for i in 0..bytes.div_ceil(2 << 20) {
        pd_bytes.extend_from_slice(&((i << 21) | PRESENT_RW_USER | HUGE).to_le_bytes());
    }
    out.push((pds, pd_bytes));
    out
}

/// GDT entries: null, kernel code, kernel data, user data (0x1b), user code
/// 64-bit (0x23). Only loaded if a segment were reloaded; the VMM sets the
/// segment registers directly.
#[must_use]
pub fn gdt() -> Vec<u8> {
    let entries: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00af_fa00_0000_ffff,
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The user code selector (GDT index 4, RPL 3).
pub const USER_CS: u16 = 0x23;
/// The user data selector (GDT index 3, RPL 3).
pub const USER_DS: u16 = 0x1b;
