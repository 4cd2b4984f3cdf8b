//! RFC 6962 Merkle tree hash (MTH), audit paths and consistency proofs, with the
//! verification algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2.
//!
//! `leaf = SHA-256(0x00 || data)`, `node = SHA-256(0x01 || left || right)`; the tree over
//! n leaves splits at the largest power of two below n.

pub type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Plain SHA-256 (for fingerprints that are not tree hashes).
pub fn sha256_of(data: &[u8]) -> Hash {
    sha256(&[data])
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `m` in the tree of `leaves` (RFC 6962 §2.1.1 PATH).
pub fn inclusion_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    assert!(
        m < leaves.len(),
        "leaf {m} outside a tree of {}",
        leaves.len()
    );
    let n = leaves.len();
    if n == 1 {
        return vec![];
    }
    let k = split(n);
    if m < k {
        let mut p = inclusion_proof(m, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(m - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// The consistency proof from the tree of the first `m` leaves to the tree of all of
/// them (RFC 6962 §2.1.2 PROOF).
pub fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    assert!(m <= leaves.len());
    if m == 0 || m == leaves.len() {
        return vec![];
    }
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete { vec![] } else { vec![root(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Checks that `leaf` is entry `index` of the tree of `size` with root `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &r == root
}

/// Checks that the tree of `size2` with `root2` extends the tree of `size1` with `root1`
/// (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> bool {
    if size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    if size1 == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        path.insert(0, *root1);
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (size1 - 1, size2 - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &fr == root1 && &sr == root2
}

/// The right edge of a growing tree (its perfect subtrees, largest first): appends in
/// O(1) amortised, the root at the current size in O(log n), without keeping the leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, hash) of each perfect subtree, left to right.
    stack: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.stack.last() {
            if h != node.0 {
                break;
            }
            self.stack.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.stack.push(node);
        self.size += 1;
    }

    /// MTH of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut r)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            r = node_hash(left, &r);
        }
        r
    }
}

/// A whole tree kept level by level (about 2n hashes), for many proofs over one size:
/// each subtree hash the RFC recursion asks for is a lookup, so a proof costs O(log n).
#[derive(Debug, Clone)]
pub struct Tree {
    /// levels[0] = leaves; levels[j][i] covers leaves [i·2^j, min((i+1)·2^j, n)).
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn new(leaves: Vec<Hash>) -> Tree {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(|l| l.as_slice()).unwrap_or(&[]);
            let up: Vec<Hash> = below
                .chunks(2)
                .map(|c| {
                    if c.len() == 2 {
                        node_hash(&c[0], &c[1])
                    } else {
                        c[0]
                    }
                })
                .collect();
            levels.push(up);
        }
        Tree { levels }
    }

    pub fn size(&self) -> usize {
        self.levels[0].len()
    }

    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }

    pub fn root(&self) -> Hash {
        match self.levels.last() {
            Some(top) if top.len() == 1 => top[0],
            _ => empty_root(),
        }
    }

    /// MTH of leaves [lo, hi).
    fn mth(&self, lo: usize, hi: usize) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return empty_root();
        }
        let j = n.next_power_of_two().trailing_zeros() as usize;
        let aligned = lo.is_multiple_of(1 << j) && (n == 1 << j || hi == self.size());
        if aligned && j < self.levels.len() {
            return self.levels[j][lo >> j];
        }
        let k = split(n);
        node_hash(&self.mth(lo, lo + k), &self.mth(lo + k, hi))
    }

    /// The audit path of leaf `m` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, m: usize, size: usize) -> Vec<Hash> {
        assert!(m < size && size <= self.size());
        let mut out = vec![];
        self.path(m, 0, size, &mut out);
        out
    }

    fn path(&self, m: usize, lo: usize, hi: usize, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, lo, lo + k, out);
            out.push(self.mth(lo + k, hi));
        } else {
            self.path(m - k, lo + k, hi, out);
            out.push(self.mth(lo, lo + k));
        }
    }

    /// The consistency proof from the first `m` leaves to the first `size` leaves.
    pub fn consistency_proof(&self, m: usize, size: usize) -> Vec<Hash> {
        assert!(m <= size && size <= self.size());
        let mut out = vec![];
        if m > 0 && m < size {
            self.sub(m, 0, size, true, &mut out);
        }
        out
    }

    fn sub(&self, m: usize, lo: usize, hi: usize, complete: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push(self.mth(lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.sub(m, lo, lo + k, complete, out);
            out.push(self.mth(lo + k, hi));
        } else {
            self.sub(m - k, lo + k, hi, false, out);
            out.push(self.mth(lo, lo + k));
        }
    }

    /// MTH of the first `size` leaves.
    pub fn root_at(&self, size: usize) -> Hash {
        self.mth(0, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The eight leaves of the RFC 6962 reference tests (certificate-transparency's
    /// merkle tree tests, also transparency-dev/merkle's test data).
    fn reference_leaves() -> Vec<Hash> {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        inputs.iter().map(|d| leaf_hash(d)).collect()
    }

    #[test]
    fn known_roots() {
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves = reference_leaves();
        for (n, want) in expected.iter().enumerate() {
            assert_eq!(hex(&root(&leaves[..n + 1])), *want, "tree of {}", n + 1);
        }
        assert_eq!(
            hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// xorshift, so the "random" trees are the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_mutations_fail() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for n in 1..=70usize {
            let leaves: Vec<Hash> = (0..n)
                .map(|i| leaf_hash(&(i as u64 * 7919).to_le_bytes()))
                .collect();
            let r = root(&leaves);
            for m in 0..n {
                let p = inclusion_proof(m, &leaves);
                assert!(
                    verify_inclusion(m as u64, n as u64, &leaves[m], &p, &r),
                    "n={n} m={m}"
                );
                // Wrong leaf, wrong index, wrong size, a flipped proof byte: all refused.
                let other = leaf_hash(b"not in the tree");
                assert!(!verify_inclusion(m as u64, n as u64, &other, &p, &r));
                if n > 1 {
                    let wrong = (m + 1 + rng.next() as usize % (n - 1)) % n;
                    assert!(
                        !verify_inclusion(wrong as u64, n as u64, &leaves[m], &p, &r)
                            || leaves[wrong] == leaves[m]
                    );
                    let mut bad = p.clone();
                    let i = rng.next() as usize % bad.len();
                    bad[i][rng.next() as usize % 32] ^= 1;
                    assert!(!verify_inclusion(m as u64, n as u64, &leaves[m], &bad, &r));
                }
                // A proof for one leaf never verifies against a root that lacks it.
                assert!(!verify_inclusion(
                    m as u64,
                    n as u64,
                    &leaves[m],
                    &p,
                    &leaf_hash(b"x")
                ));
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_rewrites_fail() {
        let mut rng = Rng(42);
        for n in 1..=40usize {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&[i as u8, 0xAB])).collect();
            let r2 = root(&leaves);
            for m in 0..=n {
                let r1 = root(&leaves[..m]);
                let p = consistency_proof(m, &leaves);
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &r1, &r2),
                    "m={m} n={n}"
                );
                if m > 0 && m < n {
                    // A rewritten history (one old leaf changed) is not consistent.
                    let mut forged = leaves.clone();
                    let i = rng.next() as usize % m;
                    forged[i] = leaf_hash(b"rewritten");
                    let forged_old = root(&forged[..m]);
                    assert!(!verify_consistency(
                        m as u64,
                        n as u64,
                        &p,
                        &forged_old,
                        &r2
                    ));
                    let mut bad = p.clone();
                    let j = rng.next() as usize % bad.len();
                    bad[j][0] ^= 0x80;
                    assert!(!verify_consistency(m as u64, n as u64, &bad, &r1, &r2));
                }
            }
        }
    }

    #[test]
    fn frontier_and_tree_agree_with_the_recursive_definitions() {
        let mut rng = Rng(7);
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::new();
        assert_eq!(f.root(), empty_root());
        for (i, l) in leaves.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.size(), i as u64 + 1);
            assert_eq!(
                f.root(),
                root(&leaves[..=i]),
                "frontier root at size {}",
                i + 1
            );
        }
        let tree = Tree::new(leaves.clone());
        assert_eq!(tree.root(), root(&leaves));
        for _ in 0..400 {
            let size = 1 + (rng.next() as usize) % leaves.len();
            let m = (rng.next() as usize) % size;
            assert_eq!(tree.root_at(size), root(&leaves[..size]));
            assert_eq!(
                tree.inclusion_proof(m, size),
                inclusion_proof(m, &leaves[..size])
            );
            let m2 = (rng.next() as usize) % (size + 1);
            assert_eq!(
                tree.consistency_proof(m2, size),
                consistency_proof(m2, &leaves[..size]),
                "consistency {m2} -> {size}"
            );
        }
    }
}
