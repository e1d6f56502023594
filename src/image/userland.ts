/**
 * Unpacks .deb files into a root directory and does by hand the parts of the
 * maintainer scripts a VM depends on. Extraction never runs package scripts:
 * they would run on the host, as the build's user.
 *
 * The result has few top-level entries (the sandbox binds each one): `usr`,
 * `etc`, `opt`, and merged-/usr symlinks `bin`, `sbin`, `lib`, `lib64` → `usr/…`,
 * as Debian's usrmerge lays out a bookworm system.
 */
import { execFile } from "node:child_process";
import { lstat, mkdir, readdir, readFile, readlink, rename, rm, rmdir, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

/** Top-level directories packages ship that merged /usr turns into symlinks. */
const MERGED_DIRS = ["bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/** Top-level entries kept; the rest (boot, home, proc, run, tmp, var, …) the sandbox provides or a VM does not use. */
const KEPT_TOP_LEVEL = new Set(["usr", "etc", "opt", ...MERGED_DIRS]);

/** Paths that only serve people reading docs or package management on a live system. */
const USELESS = [
  "usr/share/doc",
  "usr/share/doc-base",
  "usr/share/man",
  "usr/share/info",
  "usr/share/locale",
  "usr/share/lintian",
  "usr/share/bug",
  "usr/share/menu",
  "usr/share/common-licenses",
  "etc/cron.daily",
  "etc/logrotate.d",
  "etc/init.d",
  "etc/systemd",
  "usr/lib/systemd",
  "usr/lib/tmpfiles.d",
];

/**
 * What update-alternatives would have linked (from the packages' postinst
 * scripts): link → target, both inside the image.
 */
const ALTERNATIVES: Record<string, string> = {
  "usr/bin/awk": "gawk",
  "usr/bin/nawk": "gawk",
  "usr/bin/pager": "less",
  "usr/bin/which": "which.debianutils",
  "usr/bin/w": "w.procps",
  "usr/bin/lzma": "xz",
  "usr/bin/unlzma": "unxz",
  // busybox is a multi-call binary: named vi, it is vi (for terminals; Debian links no applets).
  "usr/bin/vi": "busybox",
  "usr/bin/lzcat": "xzcat",
};

/** Extracts every package into root; two at a time, the machine's usual core count. */
export async function extractPackages(debs: readonly string[], root: string): Promise<void> {
  const queue = [...debs];
  const worker = async (): Promise<void> => {
    for (let deb = queue.shift(); deb; deb = queue.shift()) await run("dpkg-deb", ["-x", deb, root]);
  };
  await Promise.all([worker(), worker()]);
}

/** Merged /usr: moves /bin, /lib, … into /usr and leaves relative symlinks behind. */
export async function mergeUsr(root: string): Promise<void> {
  for (const dir of MERGED_DIRS) {
    const top = join(root, dir);
    const info = await lstat(top).catch(() => undefined);
    if (info?.isDirectory()) {
      await mkdir(join(root, "usr", dir), { recursive: true });
      await moveInto(top, join(root, "usr", dir));
      await rmdir(top);
    }
    if (dir === "bin" || dir === "sbin" || dir === "lib" || info) {
      await rm(top, { force: true });
      await mkdir(join(root, "usr", dir), { recursive: true });
      await symlink(`usr/${dir}`, top);
    }
  }
}

/** Moves every entry of from into to; where both have a file, the real file beats a symlink. */
async function moveInto(from: string, to: string): Promise<void> {
  for (const name of await readdir(from)) {
    const source = join(from, name);
    const target = join(to, name);
    const [s, t] = await Promise.all([lstat(source), lstat(target).catch(() => undefined)]);
    if (!t) {
      await rename(source, target);
    } else if (s.isDirectory() && t.isDirectory()) {
      await moveInto(source, target);
      await rmdir(source);
    } else if (t.isSymbolicLink() && !s.isSymbolicLink()) {
      await rm(target);
      await rename(source, target);
    } else {
      await rm(source, { recursive: true }); // the /usr copy wins
    }
  }
}

/** Drops docs, man pages, translations and top-level directories a VM does not get from the image. */
export async function strip(root: string): Promise<void> {
  for (const path of USELESS) await rm(join(root, path), { recursive: true, force: true });
  for (const name of await readdir(root)) {
    if (!KEPT_TOP_LEVEL.has(name)) await rm(join(root, name), { recursive: true, force: true });
  }
}

/** Writes the files maintainer scripts and the installer would have made. */
export async function configure(root: string): Promise<void> {
  for (const [link, target] of Object.entries(ALTERNATIVES)) {
    const exists = await lstat(join(root, link)).catch(() => undefined);
    const present = await lstat(join(root, "usr/bin", target)).catch(() => undefined);
    if (!exists && present) await symlink(target, join(root, link));
  }
  const etc = join(root, "etc");
  await mkdir(join(etc, "ssl/certs"), { recursive: true });
  await writeFile(join(etc, "ssl/certs/ca-certificates.crt"), await caBundle(root));
  // The guest runs as uid 0 of its own user namespace; its home is the VM's.
  await writeFile(join(etc, "passwd"), "root:x:0:0:root:/home/agentos:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
  await writeFile(join(etc, "group"), "root:x:0:\nnogroup:x:65534:\n");
  await writeFile(join(etc, "nsswitch.conf"), "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n");
  await writeFile(join(etc, "gitconfig"), "[safe]\n\tdirectory = *\n[init]\n\tdefaultBranch = main\n");
  // Mount points: the sandbox binds per-VM files over these, so they must be regular files.
  await writeFile(join(etc, "resolv.conf"), "");
  await writeFile(join(etc, "hosts"), "");
  await rm(join(etc, "mtab"), { force: true });
  await symlink("../proc/self/mounts", join(etc, "mtab"));
  // No tzdata in the image: /etc/localtime stays absent and guests get TZ=UTC.
  await rm(join(etc, "localtime"), { force: true });
  // /usr/local belongs to the VM's image, empty: host programs never show up in a VM.
  await rm(join(root, "usr/local"), { recursive: true, force: true });
  await mkdir(join(root, "usr/local"));
}

/** What update-ca-certificates writes: every certificate under /usr/share/ca-certificates, concatenated. */
async function caBundle(root: string): Promise<string> {
  const base = join(root, "usr/share/ca-certificates");
  const files = (await readdir(base, { recursive: true })).filter((name) => name.endsWith(".crt")).sort();
  const parts = await Promise.all(files.map((name) => readFile(join(base, name), "utf8")));
  return parts.map((text) => (text.endsWith("\n") ? text : `${text}\n`)).join("");
}

/** The image root's top-level entries as the sandbox recreates them. */
export async function topLevelEntries(root: string): Promise<{ name: string; kind: "dir" | "symlink"; target?: string }[]> {
  const entries: { name: string; kind: "dir" | "symlink"; target?: string }[] = [];
  for (const name of (await readdir(root)).sort()) {
    if (name.startsWith(".")) continue; // the manifest
    const info = await lstat(join(root, name));
    if (info.isSymbolicLink()) entries.push({ name, kind: "symlink", target: await readlink(join(root, name)) });
    else if (info.isDirectory()) entries.push({ name, kind: "dir" });
  }
  return entries;
}
