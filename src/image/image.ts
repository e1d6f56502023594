/**
 * The VM image: a read-only Debian userland shared by every VM, plus software
 * layers. Built once per machine into the image cache, found with a stat after
 * that, and memoized per process.
 *
 * The id hashes everything the content depends on (packages actually used, node
 * and npm versions, LAYOUT_VERSION, the catalog's layer mount points), so a change to any of them builds a new
 * directory beside the old one; a failed build never touches an existing image.
 */
import { createHash } from "node:crypto";
import { lstat, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildOnce, exists, imageCacheDir } from "./cache.ts";
import type { PinnedPackage } from "./closure.ts";
import { checkTools, choosePackageSet, downloadPackages } from "./download.ts";
import { fileSystemFailure } from "./failure.ts";
import { ensureLayer, type ImageLayer } from "./layers.ts";
import { findNodeRuntime, installNodeRuntime, type NodeRuntime } from "./node-runtime.ts";
import { pinnedPackages } from "./packages.ts";
import { LAYER_MOUNT_POINTS, parseSoftware, type SoftwareEntry } from "./software.ts";
import { configure, extractPackages, mergeUsr, strip, topLevelEntries } from "./userland.ts";

/** Bump when the build lays files out differently: every machine then rebuilds. */
export const LAYOUT_VERSION = 2;

/** Written at the image root: what the image was built from. */
export const MANIFEST = ".agentvm-image.json";

export interface VmImage {
  id: string;
  /** Host directory of the base userland. */
  root: string;
  /** Top-level entries of root as the sandbox must recreate them: directories to --ro-bind and symlinks to --symlink. */
  entries: { name: string; kind: "dir" | "symlink"; target?: string }[];
  /** Read-only software layers on top of the base: host dir, where it mounts in the VM, and PATH entries it adds. */
  layers: ImageLayer[];
  /** PATH for guest processes: /opt/node/bin, layers' bins, the user prefix, /usr/local/bin, /usr/bin, /bin, /usr/sbin, /sbin. */
  path: string;
}

export interface EnsureImageOptions {
  /** Software entries of a VM definition (validated with parseSoftware). */
  software?: readonly SoftwareEntry[];
  /** Where build progress goes; default process.stderr. Silent when nothing is built. */
  onProgress?: (line: string) => void;
  /** Another Node ≥ 26 binary for /opt/node/bin/node (also AGENTVM_GUEST_NODE); an image of its own. */
  node?: string;
}

interface Manifest {
  id: string;
  layoutVersion: number;
  /** False when the host's apt could not serve the pinned versions. */
  pinned: boolean;
  packages: string[];
  node: string;
  npm: string;
  builtAt: string;
}

interface BaseImage {
  id: string;
  root: string;
  entries: VmImage["entries"];
  runtime: NodeRuntime;
}

export function imageId(packages: readonly PinnedPackage[], runtime: Pick<NodeRuntime, "version" | "npmVersion">): string {
  const input = JSON.stringify([packages.map((pkg) => `${pkg.name}=${pkg.version}`), runtime.version, runtime.npmVersion, LAYOUT_VERSION, LAYER_MOUNT_POINTS]);
  return createHash("sha256").update(input).digest("hex").slice(0, 16);
}

/** Base images by the Node binary asked for ("" for the pinned one), and their layers. */
const bases = new Map<string, Promise<BaseImage>>();
const layers = new Map<string, Promise<ImageLayer | undefined>>();

const stderrProgress = (line: string): void => void process.stderr.write(`${line}\n`);

/** Returns the VM image, building the base and the requested software layers first if this machine lacks them. */
export async function ensureImage(options: EnsureImageOptions = {}): Promise<VmImage> {
  const software = parseSoftware(options.software ?? [], "software");
  const progress = options.onProgress ?? stderrProgress;
  const node = options.node ?? "";
  let base = bases.get(node);
  if (!base) {
    const building = ensureBase(progress, options.node);
    bases.set(node, (base = building));
    building.catch(() => bases.delete(node));
  }
  const image = await base;
  const built: ImageLayer[] = [];
  for (const entry of software) {
    const key = `${image.id}\0${entry.name}`;
    let layer = layers.get(key);
    if (!layer) {
      layer = ensureLayer(entry, image.root, image.runtime, progress);
      layers.set(key, layer);
      layer.catch(() => layers.delete(key));
    }
    const found = await layer;
    if (found) built.push(found);
  }
  const path = ["/opt/node/bin", ...built.flatMap((layer) => layer.path), "/home/agentos/.local/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"];
  return { id: image.id, root: image.root, entries: image.entries, layers: built, path: path.join(":") };
}

async function ensureBase(progress: (line: string) => void, node?: string): Promise<BaseImage> {
  const runtime = await findNodeRuntime(node);
  const cache = imageCacheDir();
  // Named by the pinned set; a host that had to fall back records its real id in the manifest.
  const root = join(cache, imageId(pinnedPackages(), runtime));
  try {
    if (!(await exists(join(root, MANIFEST)))) await buildOnce(root, (tmp) => buildBase(tmp, runtime, progress));
  } catch (error) {
    const previous = await newestOther(cache, root);
    if (!previous) throw error;
    progress(`agentvm: ${(error as Error).message}`);
    progress(`agentvm: WARNING: using the previously built image ${previous} instead`);
    return open(previous, runtime);
  }
  return open(root, runtime);
}

async function open(root: string, runtime: NodeRuntime): Promise<BaseImage> {
  const manifest = JSON.parse(await readFile(join(root, MANIFEST), "utf8")) as Manifest;
  return { id: manifest.id, root, entries: await topLevelEntries(root), runtime };
}

/** The most recently built other image of the same layout, for when a new build fails. */
async function newestOther(cache: string, except: string): Promise<string | undefined> {
  let best: { root: string; builtAt: string } | undefined;
  for (const name of await readdir(cache).catch(() => [] as string[])) {
    const root = join(cache, name);
    if (root === except || name.startsWith(".")) continue;
    const manifest = await readFile(join(root, MANIFEST), "utf8").then((text) => JSON.parse(text) as Manifest, () => undefined);
    if (manifest?.layoutVersion === LAYOUT_VERSION && (!best || manifest.builtAt > best.builtAt)) best = { root, builtAt: manifest.builtAt };
  }
  return best?.root;
}

async function buildBase(root: string, runtime: NodeRuntime, progress: (line: string) => void): Promise<void> {
  const started = performance.now();
  await checkTools();
  const set = await choosePackageSet(progress);
  const id = imageId(set.packages, runtime);
  const debs = await mkdtemp(join(tmpdir(), "agentvm-debs-")).catch((error: unknown) => {
    throw fileSystemFailure("creating a download directory", error);
  });
  try {
    progress(`agentvm: building VM image ${id}: downloading ${set.packages.length} packages…`);
    const files = await downloadPackages(set, debs);
    progress(`agentvm: building VM image ${id}: extracting…`);
    await extractPackages(files, root);
  } finally {
    await rm(debs, { recursive: true, force: true });
  }
  await mergeUsr(root);
  await strip(root);
  await configure(root);
  await installNodeRuntime(runtime, root);
  // Empty mount points for the layers: bwrap cannot create them under the read-only /opt.
  for (const mountPoint of LAYER_MOUNT_POINTS) await mkdir(join(root, mountPoint), { recursive: true });
  const manifest: Manifest = {
    id,
    layoutVersion: LAYOUT_VERSION,
    pinned: set.pinned,
    packages: set.packages.map((pkg) => `${pkg.name}=${pkg.version}`),
    node: runtime.version,
    npm: runtime.npmVersion,
    builtAt: new Date().toISOString(),
  };
  await writeFile(join(root, MANIFEST), `${JSON.stringify(manifest, null, 2)}\n`);
  const megabytes = Math.round((await treeSize(root)) / 1e6);
  progress(`agentvm: building VM image ${id}: done in ${((performance.now() - started) / 1000).toFixed(1)} s, ${megabytes} MB`);
}

/** Bytes of regular files under dir, each inode once (git's builtins are hard links of one binary). */
export async function treeSize(dir: string): Promise<number> {
  let total = 0;
  const seen = new Set<number>();
  for (const name of await readdir(dir, { recursive: true })) {
    const info = await lstat(join(dir, name));
    if (info.isFile() && !seen.has(info.ino)) {
      seen.add(info.ino);
      total += info.size;
    }
  }
  return total;
}
