/**
 * Computes the dependency closure of the image's root packages with the host's
 * apt-cache. Used twice: by scripts/pin-packages.ts to write the pinned list
 * that is committed, and at build time when the host's apt cannot serve the pins.
 *
 * `apt-cache depends --recurse` lists every alternative of every `a | b`
 * dependency (mawk and original-awk for `awk`, libelogind0 for libsystemd0), so
 * we walk the graph ourselves and take one alternative per dependency: one
 * already chosen if there is one, else the first, as apt would.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const run = promisify(execFile);

/** Dependency fields apt-cache prints that we do not follow. */
const DEPENDS_FLAGS = ["--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"];

/**
 * Dependencies a VM never needs: they only serve maintainer scripts (which the
 * build never runs), package management, or init systems. The build does their
 * job itself (merged /usr, alternatives) or a VM has no use for it.
 */
export const EXCLUDED_PACKAGES: ReadonlySet<string> = new Set([
  "usrmerge", // the build merges /usr itself
  "usr-is-merged",
  "init-system-helpers", // service management; no init system in a VM
  "systemd",
  "dpkg", // no package management inside a read-only image
  "install-info",
  "debconf", // maintainer-script configuration only
  "cdebconf",
  "git-man", // man pages are stripped from the image
]);

export interface PinnedPackage {
  name: string;
  version: string;
}

/** One dependency line: alternatives in order, each a real package or a virtual one with its providers. */
type Alternative = { name: string; virtual: boolean; providers: string[] };

/** Parses `apt-cache depends` output into package → dependency groups (alternatives). */
export function parseDepends(output: string): Map<string, Alternative[][]> {
  const graph = new Map<string, Alternative[][]>();
  let groups: Alternative[][] = [];
  let current: Alternative[] = [];
  let last: Alternative | undefined;
  let continues = false;
  for (const line of output.split("\n")) {
    if (line.length === 0) continue;
    if (!line.startsWith(" ")) {
      groups = [];
      graph.set(stripArch(line.trim()), groups);
      current = [];
      continues = false;
      continue;
    }
    const dep = /^ (\|| )(PreDepends|Depends): (.+)$/.exec(line);
    if (dep) {
      if (!continues) {
        current = [];
        groups.push(current);
      }
      const virtual = dep[3]!.startsWith("<");
      last = { name: stripArch(virtual ? dep[3]!.slice(1, -1) : dep[3]!), virtual, providers: [] };
      current.push(last);
      continues = dep[1] === "|";
      continue;
    }
    // Four spaces: a package that provides the name on the previous line.
    if (/^    \S/.test(line) && last) last.providers.push(stripArch(line.trim()));
  }
  return graph;
}

function stripArch(name: string): string {
  return name.replace(/:(any|amd64|arm64|all)$/, "");
}

/** The package to add for one dependency, or undefined when it is already met (or only by excluded packages). */
function choose(group: Alternative[], chosen: Set<string>): string | undefined {
  const candidates = group.flatMap((alt) => (alt.virtual ? alt.providers : [alt.name]));
  if (candidates.some((name) => chosen.has(name))) return undefined;
  return candidates.find((name) => !EXCLUDED_PACKAGES.has(name));
}

/** Resolves roots to their closure with the host's candidate versions, sorted by name. */
export async function computeClosure(roots: readonly string[]): Promise<PinnedPackage[]> {
  const chosen = new Set<string>(roots);
  const graph = new Map<string, Alternative[][]>();
  let pending = [...roots];
  while (pending.length > 0) {
    const { stdout } = await run("apt-cache", ["depends", ...DEPENDS_FLAGS, ...pending], { maxBuffer: 64 << 20 });
    for (const [name, groups] of parseDepends(stdout)) graph.set(name, groups);
    const next: string[] = [];
    for (const name of pending) {
      for (const group of graph.get(name) ?? []) {
        const pick = choose(group, chosen);
        if (pick === undefined) continue;
        chosen.add(pick);
        next.push(pick);
      }
    }
    pending = next;
  }
  return candidateVersions([...chosen].sort());
}

/** Asks apt-cache policy for the candidate version of each package. */
export async function candidateVersions(names: readonly string[]): Promise<PinnedPackage[]> {
  const { stdout } = await run("apt-cache", ["policy", ...names], { maxBuffer: 64 << 20 });
  const found = new Map<string, string>();
  let name = "";
  for (const line of stdout.split("\n")) {
    const header = /^(\S+):$/.exec(line);
    if (header) name = stripArch(header[1]!);
    const candidate = /^  Candidate: (\S+)$/.exec(line);
    if (candidate && candidate[1] !== "(none)") found.set(name, candidate[1]!);
  }
  const missing = names.filter((n) => !found.has(n));
  if (missing.length > 0) throw new Error(`apt has no candidate version for ${missing.join(", ")}`);
  return names.map((n) => ({ name: n, version: found.get(n)! }));
}
