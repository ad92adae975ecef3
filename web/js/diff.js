// A line diff by longest common subsequence, for configuration versions.

/** JSON with object keys sorted at every level, so key order never shows as a change. */
export function canonicalText(value) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    }
    return v;
  };
  return JSON.stringify(sort(value), null, 2);
}

// Above this many cells the table would cost too much memory: the middle
// is then shown as removed and added whole.
const MAX_CELLS = 4_000_000;

/** [{op: 'same'|'del'|'add', line}] turning `a` into `b` (arrays of lines). */
export function diffLines(a, b) {
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const out = a.slice(0, start).map((line) => ({ op: 'same', line }));
  const midA = a.slice(start, endA);
  const midB = b.slice(start, endB);
  const n = midA.length;
  const m = midB.length;
  if (n * m > MAX_CELLS) {
    out.push(...midA.map((line) => ({ op: 'del', line })), ...midB.map((line) => ({ op: 'add', line })));
  } else {
    // lcs[i][j] = length of the LCS of midA[i..] and midB[j..], in one flat array.
    const w = m + 1;
    const lcs = new Uint32Array((n + 1) * w);
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        lcs[i * w + j] = midA[i] === midB[j] ? lcs[(i + 1) * w + j + 1] + 1 : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
      }
    }
    let i = 0;
    let j = 0;
    while (i < n && j < m) {
      if (midA[i] === midB[j]) {
        out.push({ op: 'same', line: midA[i] });
        i++;
        j++;
      } else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) {
        out.push({ op: 'del', line: midA[i++] });
      } else {
        out.push({ op: 'add', line: midB[j++] });
      }
    }
    while (i < n) out.push({ op: 'del', line: midA[i++] });
    while (j < m) out.push({ op: 'add', line: midB[j++] });
  }
  out.push(...a.slice(endA).map((line) => ({ op: 'same', line })));
  return out;
}
