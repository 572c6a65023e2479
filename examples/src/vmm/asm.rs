//! A tiny x86-64 encoder for the guest program: just the instruction forms
//! the guest uses, each with its encoding written out, and labels with
//! 32-bit relative jumps patched at the end. No external assembler.

use std::collections::HashMap;

/// A general-purpose 64-bit register (its number in ModRM/REX encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
#[repr(u8)]
pub enum R {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

/// A memory operand: `[base + disp]` or an absolute 32-bit address.
#[derive(Clone, Copy, Debug)]
pub enum M {
    /// `[base + disp32]`.
    Base(R, i32),
    /// `[disp32]` (absolute, through a SIB byte with no base and no index).
    Abs(u32),
}

/// A conditional jump's condition (the low nibble of `0F 8x`).
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
#[repr(u8)]
pub enum Cc {
    /// Unsigned below (CF=1).
    B = 0x2,
    /// Unsigned above or equal (CF=0).
    Ae = 0x3,
    /// Equal / zero.
    E = 0x4,
    /// Unsigned above (CF=0 and ZF=0).
    A = 0x7,
    /// Not equal / not zero.
    Ne = 0x5,
}

/// The code being assembled, its labels and the jumps to patch.
#[derive(Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    /// An empty program.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// REX prefix with W set and the high bits of `reg` and `rm`.
    fn rex_w(&mut self, reg: u8, rm: u8) {
        self.code.push(0x48 | ((reg >> 3) << 2) | (rm >> 3));
    }

    /// ModRM (+SIB, disp32) for `reg` with a memory operand.
    fn modrm_mem(&mut self, reg: u8, m: M) {
        match m {
            M::Base(base, disp) => {
                // mod=10 (disp32); rsp/r12 as base need a SIB byte (0x24).
                self.code.push(0x80 | ((reg & 7) << 3) | (base as u8 & 7));
                if base as u8 & 7 == 4 {
                    self.code.push(0x24);
                }
                self.code.extend_from_slice(&disp.to_le_bytes());
            }
            M::Abs(addr) => {
                // mod=00 rm=100, SIB scale=0 index=100 (none) base=101 (none).
                self.code.push(((reg & 7) << 3) | 0x04);
                self.code.push(0x25);
                self.code.extend_from_slice(&addr.to_le_bytes());
            }
        }
    }

    fn mem_base(m: M) -> u8 {
        match m {
            M::Base(base, _) => base as u8,
            M::Abs(_) => 0,
        }
    }

    /// `op r64, r/m64` or `op r/m64, r64` with a memory operand.
    fn op_mem(&mut self, opcode: &[u8], reg: R, m: M) {
        self.rex_w(reg as u8, Self::mem_base(m));
        self.code.extend_from_slice(opcode);
        self.modrm_mem(reg as u8, m);
    }

    /// `op r/m64, r64` between registers (`reg` in ModRM.reg, `rm` in ModRM.rm).
    fn op_rr(&mut self, opcode: &[u8], reg: R, rm: R) {
        self.rex_w(reg as u8, rm as u8);
        self.code.extend_from_slice(opcode);
        self.code
            .push(0xc0 | ((reg as u8 & 7) << 3) | (rm as u8 & 7));
    }

    /// `mov dst, imm64` (`REX.W B8+r io`).
    pub fn mov_imm(&mut self, dst: R, imm: u64) {
        self.rex_w(0, dst as u8);
        self.code.push(0xb8 + (dst as u8 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }
    /// `mov edx, imm32` (`BA id`; zero-extends into rdx), for port numbers.
    pub fn mov_edx(&mut self, imm: u32) {
        self.code.push(0xba);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }
    /// `mov dst, [m]` (`REX.W 8B /r`).
    pub fn load(&mut self, dst: R, m: M) {
        self.op_mem(&[0x8b], dst, m);
    }
    /// `mov [m], src` (`REX.W 89 /r`).
    pub fn store(&mut self, m: M, src: R) {
        self.op_mem(&[0x89], src, m);
    }
    /// `mov qword [m], imm32` sign-extended (`REX.W C7 /0 id`).
    pub fn store_imm(&mut self, m: M, imm: i32) {
        self.rex_w(0, Self::mem_base(m));
        self.code.push(0xc7);
        self.modrm_mem(0, m);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }
    /// `add dst, [m]` (`REX.W 03 /r`).
    pub fn add_mem(&mut self, dst: R, m: M) {
        self.op_mem(&[0x03], dst, m);
    }
    /// `cmp reg, [m]` (`REX.W 3B /r`).
    pub fn cmp_mem(&mut self, reg: R, m: M) {
        self.op_mem(&[0x3b], reg, m);
    }
    /// `lea dst, [m]` (`REX.W 8D /r`).
    pub fn lea(&mut self, dst: R, m: M) {
        self.op_mem(&[0x8d], dst, m);
    }
    /// `mov dst, src` (`REX.W 89 /r`).
    pub fn mov(&mut self, dst: R, src: R) {
        self.op_rr(&[0x89], src, dst);
    }
    /// `add dst, src` (`REX.W 01 /r`).
    pub fn add(&mut self, dst: R, src: R) {
        self.op_rr(&[0x01], src, dst);
    }
    /// `or dst, src` (`REX.W 09 /r`).
    pub fn or(&mut self, dst: R, src: R) {
        self.op_rr(&[0x09], src, dst);
    }
    /// `xor dst, src` (`REX.W 31 /r`).
    pub fn xor(&mut self, dst: R, src: R) {
        self.op_rr(&[0x31], src, dst);
    }
    /// `cmp a, b` (`REX.W 39 /r`: flags of a - b).
    pub fn cmp(&mut self, a: R, b: R) {
        self.op_rr(&[0x39], b, a);
    }
    /// `sub dst, src` (`REX.W 29 /r`).
    pub fn sub(&mut self, dst: R, src: R) {
        self.op_rr(&[0x29], src, dst);
    }
    /// `cmp a, imm32` sign-extended (`REX.W 81 /7 id`).
    pub fn cmp_imm(&mut self, a: R, imm: i32) {
        self.rex_w(0, a as u8);
        self.code.push(0x81);
        self.code.push(0xf8 | (a as u8 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }
    /// `test a, b` (`REX.W 85 /r`).
    pub fn test(&mut self, a: R, b: R) {
        self.op_rr(&[0x85], b, a);
    }
    /// `imul dst, src` (`REX.W 0F AF /r`).
    pub fn imul(&mut self, dst: R, src: R) {
        self.op_rr(&[0x0f, 0xaf], dst, src);
    }
    /// `add dst, imm32` sign-extended (`REX.W 81 /0 id`).
    pub fn add_imm(&mut self, dst: R, imm: i32) {
        self.rex_w(0, dst as u8);
        self.code.push(0x81);
        self.code.push(0xc0 | (dst as u8 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }
    /// `shl dst, imm8` (`REX.W C1 /4 ib`).
    pub fn shl(&mut self, dst: R, imm: u8) {
        self.rex_w(0, dst as u8);
        self.code
            .extend_from_slice(&[0xc1, 0xe0 | (dst as u8 & 7), imm]);
    }
    /// `inc dst` (`REX.W FF /0`).
    pub fn inc(&mut self, dst: R) {
        self.rex_w(0, dst as u8);
        self.code.extend_from_slice(&[0xff, 0xc0 | (dst as u8 & 7)]);
    }
    /// `dec dst` (`REX.W FF /1`).
    pub fn dec(&mut self, dst: R) {
        self.rex_w(0, dst as u8);
        self.code.extend_from_slice(&[0xff, 0xc8 | (dst as u8 & 7)]);
    }
    /// `rdtsc` (`0F 31`): edx:eax = TSC.
    pub fn rdtsc(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0x31]);
    }
    /// `out dx, eax` (`EF`).
    pub fn out_dx_eax(&mut self) {
        self.code.push(0xef);
    }
    /// `hlt` (`F4`): privileged, so it faults in ring 3.
    pub fn hlt(&mut self) {
        self.code.push(0xf4);
    }
    /// Define `name` at the current position.
    ///
    /// # Panics
    /// If `name` is already defined (a bug in the guest program).
    pub fn label(&mut self, name: &'static str) {
        assert!(
            self.labels.insert(name, self.code.len()).is_none(),
            "label {name} twice"
        );
    }
    /// `jmp name` (`E9 cd`).
    pub fn jmp(&mut self, name: &'static str) {
        self.code.push(0xe9);
        self.rel32(name);
    }
    /// `jcc name` (`0F 8x cd`).
    pub fn jcc(&mut self, cc: Cc, name: &'static str) {
        self.code.extend_from_slice(&[0x0f, 0x80 | cc as u8]);
        self.rel32(name);
    }
    fn rel32(&mut self, name: &'static str) {
        self.fixups.push((self.code.len(), name));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// The machine code, jumps patched.
    ///
    /// # Panics
    /// On a jump to an undefined label (a bug in the guest program).
    #[must_use]
    pub fn finish(mut self) -> Vec<u8> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("label {name} undefined"));
            let rel = i32::try_from(target as i64 - (at as i64 + 4)).expect("jump within 2 GiB");
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::new();
        f(&mut a);
        a.finish()
    }

    /// Encodings checked against the Intel SDM tables (and objdump).
    #[test]
    fn encodings() {
        assert_eq!(one(|a| a.mov(R::Rax, R::Rbx)), [0x48, 0x89, 0xd8]);
        assert_eq!(one(|a| a.imul(R::Rax, R::R15)), [0x49, 0x0f, 0xaf, 0xc7]);
        assert_eq!(
            one(|a| a.load(R::Rax, M::Base(R::Rsi, 8))),
            [0x48, 0x8b, 0x86, 8, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.load(R::R9, M::Base(R::R12, 0))),
            [0x4d, 0x8b, 0x8c, 0x24, 0, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.load(R::Rcx, M::Abs(0x8000))),
            [0x48, 0x8b, 0x0c, 0x25, 0, 0x80, 0, 0]
        );
        assert_eq!(
            one(|a| a.store(M::Abs(0x8040), R::R13)),
            [0x4c, 0x89, 0x2c, 0x25, 0x40, 0x80, 0, 0]
        );
        assert_eq!(one(|a| a.shl(R::Rdx, 32)), [0x48, 0xc1, 0xe2, 32]);
        assert_eq!(one(|a| a.inc(R::R13)), [0x49, 0xff, 0xc5]);
        assert_eq!(one(|a| a.dec(R::Rcx)), [0x48, 0xff, 0xc9]);
        assert_eq!(one(|a| a.cmp(R::Rax, R::R12)), [0x4c, 0x39, 0xe0]);
        assert_eq!(one(|a| a.xor(R::R8, R::R8)), [0x4d, 0x31, 0xc0]);
        assert_eq!(one(|a| a.sub(R::Rcx, R::Rax)), [0x48, 0x29, 0xc1]);
        assert_eq!(
            one(|a| a.cmp_imm(R::R9, 64)),
            [0x49, 0x81, 0xf9, 64, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.mov_imm(R::R15, 1)),
            [0x49, 0xbf, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.store_imm(M::Abs(0x8020), 0)),
            [0x48, 0xc7, 0x04, 0x25, 0x20, 0x80, 0, 0, 0, 0, 0, 0]
        );
        // A backward jump to itself: E9 FB FF FF FF.
        assert_eq!(
            one(|a| {
                a.label("x");
                a.jmp("x");
            }),
            [0xe9, 0xfb, 0xff, 0xff, 0xff]
        );
    }
}
