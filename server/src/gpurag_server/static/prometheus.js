// Reading the server's /metrics (Prometheus text format) in the browser: cumulative histogram
// buckets, their difference between two samples, and quantiles as Prometheus's
// histogram_quantile computes them (linear interpolation inside the bucket).

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** Every sample in `text`: [{name, labels: {..}, value}]. Comments and blank lines are skipped. */
export function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = LINE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) labels[key] = value;
    const value = match[3] === "+Inf" ? Infinity : Number(match[3]);
    samples.push({ name: match[1], labels, value });
  }
  return samples;
}

/**
 * The cumulative buckets of histogram `name`, summed over its other labels:
 * [[upperBound, cumulativeCount], ...] sorted by bound, +Inf last.
 */
export function histogramBuckets(samples, name) {
  const byBound = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket` || s.labels.le === undefined) continue;
    const bound = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + s.value);
  }
  return [...byBound.entries()].sort((a, b) => a[0] - b[0]);
}

/** `later` minus `earlier`, bucket by bucket (a server restart, where counts fell, gives null). */
export function bucketDelta(later, earlier) {
  if (!earlier) return later;
  const before = new Map(earlier);
  const delta = later.map(([bound, count]) => [bound, count - (before.get(bound) || 0)]);
  return delta.some(([, count]) => count < 0) ? null : delta;
}

/**
 * The q-quantile (0..1) of observations in cumulative `buckets`, or null when it holds none.
 * As Prometheus: interpolate linearly inside the bucket holding the rank; a rank in the +Inf
 * bucket answers the highest finite bound.
 */
export function quantile(q, buckets) {
  if (!buckets || buckets.length === 0) return null;
  const total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lowerBound = 0;
  let lowerCount = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (bound === Infinity) return lowerBound;
      if (count === lowerCount) return bound;
      return lowerBound + ((bound - lowerBound) * (rank - lowerCount)) / (count - lowerCount);
    }
    lowerBound = bound;
    lowerCount = count;
  }
  return lowerBound;
}

/** Per-bucket counts (not cumulative) of an integer-bounded histogram: [{label, value}]. */
export function bucketCounts(buckets) {
  const bins = [];
  let previous = 0;
  for (const [bound, count] of buckets) {
    const label = bound === Infinity ? `>${bins.length ? bins[bins.length - 1].label : 0}` : String(bound);
    bins.push({ label, value: Math.round(count - previous) });
    previous = count;
  }
  if (bins.length && bins[bins.length - 1].label.startsWith(">") && bins[bins.length - 1].value === 0) bins.pop();
  return bins;
}
