//! SCTP's CRC32c after a port rewrite, updated rather than recomputed (a loop over
//! the whole packet would not fit the verifier): the CRC is linear, so the new one is
//! the old one plus the CRC of the changed bytes shifted past the rest of the packet,
//! a product in GF(2)[x] modulo the polynomial (zlib's `crc32_combine` method).

/// The Castagnoli polynomial, bit-reflected: bit 31 is x^0.
const POLY: u32 = 0x82f6_3b78;
/// x^0 in the reflected representation.
const ONE: u32 = 1 << 31;

/// All ones when `bit` (0 or 1) is set: a choice without a branch, since every
/// branch on packet data doubles the paths the verifier walks.
const fn mask(bit: u32) -> u32 {
    0u32.wrapping_sub(bit & 1)
}

/// b·x modulo the polynomial.
const fn times_x(b: u32) -> u32 {
    (b >> 1) ^ (POLY & mask(b))
}

/// b·x^n modulo the polynomial.
const fn times_x_to(mut b: u32, n: u32) -> u32 {
    let mut i = 0;
    while i < n {
        b = times_x(b);
        i += 1;
    }
    b
}

/// a·b modulo the polynomial, in 32 fixed steps without branches.
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        product ^= b & mask(a >> (31 - i));
        b = times_x(b);
        i += 1;
    }
    product
}

/// x^(8·i + 32) for i < 256: the raw CRC of four bytes (x^32) shifted past i zero
/// bytes.
const LOW: [u32; 256] = {
    let mut power = times_x_to(ONE, 32);
    let mut table = [0; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = power;
        power = times_x_to(power, 8);
        i += 1;
    }
    table
};

/// x^(8·256·j) for j < 256: shifts past 256·j zero bytes.
const HIGH: [u32; 256] = {
    // x^8·256 = x^2048: x^8 squared eight times.
    let mut step = times_x_to(ONE, 8);
    let mut i = 0;
    while i < 8 {
        step = multiply(step, step);
        i += 1;
    }
    let mut table = [0; 256];
    let mut power = ONE;
    let mut j = 0;
    while j < 256 {
        table[j] = power;
        power = multiply(power, step);
        j += 1;
    }
    table
};

/// The checksum of a packet whose first four bytes changed by `delta` (old XOR new,
/// as the little-endian word of those bytes), `len` bytes long in all, from `crc`.
#[inline(never)]
pub fn update(crc: u32, delta: u32, len: u16) -> u32 {
    let zeros = usize::from(len.saturating_sub(4));
    // Both indexes are below 256: a byte of a 16-bit length each.
    let shift = multiply(LOW[zeros & 0xff], HIGH[(zeros >> 8) & 0xff]);
    crc ^ multiply(shift, delta)
}
