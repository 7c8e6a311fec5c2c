//! A small eBPF assembler: the instructions the fast-path programs use, with named jump labels
//! resolved at the end. Encodings follow the kernel's `include/uapi/linux/bpf.h` and
//! `Documentation/bpf/standardization/instruction-set.rst`.
//!
//! The programs are written here instead of compiled from C so that building tug needs no clang
//! and no BPF linker; they are a few dozen instructions each, and the kernel's verifier checks
//! every one at load time.

use std::collections::HashMap;

/// A register. `R0` holds return values, `R1`-`R5` arguments (clobbered by calls), `R6`-`R9`
/// are kept across calls, `R10` is the read-only frame pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Reg {
    R0 = 0,
    R1 = 1,
    R2 = 2,
    R3 = 3,
    R4 = 4,
    R5 = 5,
    R6 = 6,
    R7 = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
}

/// Access width of a load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
    /// 8 bytes.
    Dw,
}

impl Size {
    fn code(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::Dw => 0x18,
        }
    }
}

/// Arithmetic operations used by the programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alu {
    Add,
    Sub,
    Or,
    And,
    Rsh,
    Xor,
    Mov,
}

impl Alu {
    fn code(self) -> u8 {
        match self {
            Alu::Add => 0x00,
            Alu::Sub => 0x10,
            Alu::Or => 0x40,
            Alu::And => 0x50,
            Alu::Rsh => 0x70,
            Alu::Xor => 0xa0,
            Alu::Mov => 0xb0,
        }
    }
}

/// Conditional jumps (unsigned comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cond {
    Eq,
    Gt,
    Ne,
    Lt,
    Le,
}

impl Cond {
    fn code(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ne => 0x50,
            Cond::Lt => 0xa0,
            Cond::Le => 0xb0,
        }
    }
}

const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_JMP32: u8 = 0x06;
const CLASS_ALU64: u8 = 0x07;
const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const MODE_ATOMIC: u8 = 0xc0;
const SRC_K: u8 = 0x00;
const SRC_X: u8 = 0x08;
const OP_END: u8 = 0xd0;
/// `BPF_TO_BE` of a byte-swap instruction.
const TO_BE: u8 = 0x08;
const OP_JA: u8 = 0x00;
const OP_CALL: u8 = 0x80;
const OP_EXIT: u8 = 0x90;
const ATOMIC_ADD: i32 = 0x00;
/// `src_reg` of a 64-bit immediate load whose immediate is a map's file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// One 8-byte instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst: dst as u8,
            src: src as u8,
            off,
            imm,
        }
    }

    /// The kernel's `struct bpf_insn` layout, little-endian.
    pub(crate) fn to_bytes(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[0] = self.code;
        out[1] = (self.dst & 0x0f) | (self.src << 4);
        out[2..4].copy_from_slice(&self.off.to_le_bytes());
        out[4..8].copy_from_slice(&self.imm.to_le_bytes());
        out
    }
}

/// A label that was jumped to but never placed, or placed twice, or a jump too far.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AsmError {
    #[error("label {0:?} is jumped to but never placed")]
    Undefined(&'static str),
    #[error("label {0:?} is placed twice")]
    Duplicate(&'static str),
    #[error("the jump to {0:?} is out of range")]
    TooFar(&'static str),
}

/// Builds a program; jumps name labels placed with [`Asm::label`].
#[derive(Debug, Default)]
pub(crate) struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
    duplicate: Option<&'static str>,
}

impl Asm {
    pub(crate) fn new() -> Asm {
        Asm::default()
    }

    fn push(&mut self, insn: Insn) -> &mut Asm {
        self.insns.push(insn);
        self
    }

    /// Place `name` at the next instruction.
    pub(crate) fn label(&mut self, name: &'static str) -> &mut Asm {
        if self.labels.insert(name, self.insns.len()).is_some() {
            self.duplicate.get_or_insert(name);
        }
        self
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub(crate) fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.alu64_imm(Alu::Mov, dst, imm)
    }

    /// `dst = src` (64-bit).
    pub(crate) fn mov(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.push(Insn::new(
            CLASS_ALU64 | Alu::Mov.code() | SRC_X,
            dst,
            src,
            0,
            0,
        ))
    }

    /// `dst op= imm` on all 64 bits (the immediate is sign-extended).
    pub(crate) fn alu64_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Asm {
        self.push(Insn::new(
            CLASS_ALU64 | op.code() | SRC_K,
            dst,
            Reg::R0,
            0,
            imm,
        ))
    }

    /// `dst op= src` on all 64 bits.
    pub(crate) fn alu64_reg(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Asm {
        self.push(Insn::new(CLASS_ALU64 | op.code() | SRC_X, dst, src, 0, 0))
    }

    /// `dst = htons(dst)`: the low 16 bits in network order (swapped on this little-endian
    /// machine), the rest zero.
    pub(crate) fn htons(&mut self, dst: Reg) -> &mut Asm {
        self.push(Insn::new(CLASS_ALU | OP_END | TO_BE, dst, Reg::R0, 0, 16))
    }

    /// `dst = imm` with a full 64-bit immediate (a two-slot instruction).
    pub(crate) fn load_imm64(&mut self, dst: Reg, imm: u64) -> &mut Asm {
        let (low, high) = (imm as u32 as i32, (imm >> 32) as u32 as i32);
        self.push(Insn::new(
            CLASS_LD | MODE_IMM | Size::Dw.code(),
            dst,
            Reg::R0,
            0,
            low,
        ));
        self.push(Insn::new(0, Reg::R0, Reg::R0, 0, high))
    }

    /// `dst op= imm` on the low 32 bits; the upper half becomes zero.
    pub(crate) fn alu32_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Asm {
        self.push(Insn::new(
            CLASS_ALU | op.code() | SRC_K,
            dst,
            Reg::R0,
            0,
            imm,
        ))
    }

    /// `dst = *(size *)(src + off)`, zero-extended.
    pub(crate) fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::new(
            CLASS_LDX | MODE_MEM | size.code(),
            dst,
            src,
            off,
            0,
        ))
    }

    /// `*(size *)(dst + off) = src`.
    pub(crate) fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Asm {
        self.push(Insn::new(
            CLASS_STX | MODE_MEM | size.code(),
            dst,
            src,
            off,
            0,
        ))
    }

    /// `*(size *)(dst + off) = imm`.
    pub(crate) fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Asm {
        self.push(Insn::new(
            CLASS_ST | MODE_MEM | size.code(),
            dst,
            Reg::R0,
            off,
            imm,
        ))
    }

    /// `*(u64 *)(dst + off) += src`, atomically.
    pub(crate) fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Asm {
        self.push(Insn::new(
            CLASS_STX | MODE_ATOMIC | Size::Dw.code(),
            dst,
            src,
            off,
            ATOMIC_ADD,
        ))
    }

    /// `dst = the map with file descriptor fd` (a two-slot instruction).
    pub(crate) fn load_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Asm {
        self.push(Insn {
            code: CLASS_LD | MODE_IMM | Size::Dw.code(),
            dst: dst as u8,
            src: PSEUDO_MAP_FD,
            off: 0,
            imm: fd,
        });
        self.push(Insn::new(0, Reg::R0, Reg::R0, 0, 0))
    }

    fn jump(&mut self, code: u8, dst: Reg, src: Reg, imm: i32, to: &'static str) -> &mut Asm {
        self.jumps.push((self.insns.len(), to));
        self.push(Insn::new(code, dst, src, 0, imm))
    }

    /// `goto to`.
    pub(crate) fn goto(&mut self, to: &'static str) -> &mut Asm {
        self.jump(CLASS_JMP | OP_JA, Reg::R0, Reg::R0, 0, to)
    }

    /// `if dst cond imm goto to`, comparing all 64 bits.
    pub(crate) fn jump_imm(
        &mut self,
        cond: Cond,
        dst: Reg,
        imm: i32,
        to: &'static str,
    ) -> &mut Asm {
        self.jump(CLASS_JMP | cond.code() | SRC_K, dst, Reg::R0, imm, to)
    }

    /// `if (u32)dst cond (u32)imm goto to`.
    pub(crate) fn jump32_imm(
        &mut self,
        cond: Cond,
        dst: Reg,
        imm: i32,
        to: &'static str,
    ) -> &mut Asm {
        self.jump(CLASS_JMP32 | cond.code() | SRC_K, dst, Reg::R0, imm, to)
    }

    /// `if dst cond src goto to`, comparing all 64 bits.
    pub(crate) fn jump_reg(
        &mut self,
        cond: Cond,
        dst: Reg,
        src: Reg,
        to: &'static str,
    ) -> &mut Asm {
        self.jump(CLASS_JMP | cond.code() | SRC_X, dst, src, 0, to)
    }

    /// Call kernel helper number `helper`.
    pub(crate) fn call(&mut self, helper: i32) -> &mut Asm {
        self.push(Insn::new(CLASS_JMP | OP_CALL, Reg::R0, Reg::R0, 0, helper))
    }

    /// Return `R0`.
    pub(crate) fn exit(&mut self) -> &mut Asm {
        self.push(Insn::new(CLASS_JMP | OP_EXIT, Reg::R0, Reg::R0, 0, 0))
    }

    /// Resolve the jumps.
    pub(crate) fn finish(&self) -> Result<Vec<Insn>, AsmError> {
        if let Some(name) = self.duplicate {
            return Err(AsmError::Duplicate(name));
        }
        let mut insns = self.insns.clone();
        for &(at, to) in &self.jumps {
            let target = *self.labels.get(to).ok_or(AsmError::Undefined(to))?;
            let off = i64::try_from(target).unwrap_or(i64::MAX)
                - i64::try_from(at).unwrap_or(i64::MAX)
                - 1;
            insns[at].off = i16::try_from(off).map_err(|_| AsmError::TooFar(to))?;
        }
        Ok(insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), AsmError>;

    #[test]
    fn encodings_match_the_kernel_layout() -> TestResult {
        let mut asm = Asm::new();
        asm.mov_imm(Reg::R0, -1)
            .load(Size::W, Reg::R2, Reg::R1, 76)
            .store_imm(Size::H, Reg::R10, -2, 0x580a)
            .atomic_add64(Reg::R0, 8, Reg::R1)
            .load_map_fd(Reg::R1, 7)
            .call(23)
            .exit();
        let bytes: Vec<[u8; 8]> = asm.finish()?.into_iter().map(Insn::to_bytes).collect();
        // BPF_ALU64|BPF_MOV|BPF_K r0, -1
        assert_eq!(bytes[0], [0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        // BPF_LDX|BPF_MEM|BPF_W r2 = *(u32 *)(r1 + 76)
        assert_eq!(bytes[1], [0x61, 0x12, 76, 0, 0, 0, 0, 0]);
        // BPF_ST|BPF_MEM|BPF_H *(u16 *)(r10 - 2) = 0x580a
        assert_eq!(bytes[2], [0x6a, 0x0a, 0xfe, 0xff, 0x0a, 0x58, 0, 0]);
        // BPF_STX|BPF_ATOMIC|BPF_DW, BPF_ADD
        assert_eq!(bytes[3], [0xdb, 0x10, 8, 0, 0, 0, 0, 0]);
        // BPF_LD|BPF_DW|BPF_IMM with BPF_PSEUDO_MAP_FD, then the second half
        assert_eq!(bytes[4], [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(bytes[5], [0; 8]);
        assert_eq!(bytes[6], [0x85, 0, 0, 0, 23, 0, 0, 0]);
        assert_eq!(bytes[7], [0x95, 0, 0, 0, 0, 0, 0, 0]);
        Ok(())
    }

    #[test]
    fn swaps_wide_immediates_and_register_operations_match_the_kernel_layout() -> TestResult {
        let mut asm = Asm::new();
        asm.htons(Reg::R4)
            .load_imm64(Reg::R4, 0x0e00_0000_0000_0053)
            .alu64_reg(Alu::Add, Reg::R0, Reg::R5)
            .alu64_imm(Alu::Rsh, Reg::R5, 16)
            .alu64_imm(Alu::Xor, Reg::R0, 0xffff)
            .alu64_imm(Alu::Or, Reg::R9, 0xc0);
        let bytes: Vec<[u8; 8]> = asm.finish()?.into_iter().map(Insn::to_bytes).collect();
        // BPF_ALU|BPF_END|BPF_TO_BE r4, 16
        assert_eq!(bytes[0], [0xdc, 0x04, 0, 0, 16, 0, 0, 0]);
        // BPF_LD|BPF_DW|BPF_IMM: the low half, then the high half in the second slot
        assert_eq!(bytes[1], [0x18, 0x04, 0, 0, 0x53, 0, 0, 0]);
        assert_eq!(bytes[2], [0, 0, 0, 0, 0, 0, 0, 0x0e]);
        // BPF_ALU64|BPF_ADD|BPF_X r0 += r5
        assert_eq!(bytes[3], [0x0f, 0x50, 0, 0, 0, 0, 0, 0]);
        // BPF_ALU64|BPF_RSH|BPF_K r5 >>= 16
        assert_eq!(bytes[4], [0x77, 0x05, 0, 0, 16, 0, 0, 0]);
        // BPF_ALU64|BPF_XOR|BPF_K r0 ^= 0xffff
        assert_eq!(bytes[5], [0xa7, 0x00, 0, 0, 0xff, 0xff, 0, 0]);
        // BPF_ALU64|BPF_OR|BPF_K r9 |= 0xc0
        assert_eq!(bytes[6], [0x47, 0x09, 0, 0, 0xc0, 0, 0, 0]);
        Ok(())
    }

    #[test]
    fn jumps_resolve_forwards_and_backwards() -> TestResult {
        let mut asm = Asm::new();
        asm.label("top")
            .jump32_imm(Cond::Ne, Reg::R1, 8, "out")
            .load_map_fd(Reg::R1, 3)
            .jump_imm(Cond::Eq, Reg::R0, 0, "top")
            .label("out")
            .exit();
        let insns = asm.finish()?;
        // From 0 over the jump itself, the two-slot load and the goto: 3 ahead.
        assert_eq!(insns[0].off, 3);
        assert_eq!(insns[0].code, 0x56);
        assert_eq!(insns[3].off, -4);
        Ok(())
    }

    #[test]
    fn unplaced_and_duplicate_labels_are_errors() {
        let mut asm = Asm::new();
        asm.jump_imm(Cond::Eq, Reg::R0, 0, "nowhere").exit();
        assert_eq!(asm.finish(), Err(AsmError::Undefined("nowhere")));
        let mut asm = Asm::new();
        asm.label("a").label("a").exit();
        assert_eq!(asm.finish(), Err(AsmError::Duplicate("a")));
    }
}
