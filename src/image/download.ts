/**
 * Fetches the image's .deb files with the host's apt-get. The pinned set comes
 * first; a host whose apt does not carry those versions (another point release,
 * Ubuntu) gets the closure of the same roots at its own candidate versions, and
 * the build says loudly that the image is not the pinned one.
 */
import { execFile } from "node:child_process";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { computeClosure, type PinnedPackage } from "./closure.ts";
import { buildFailed, fileSystemFailure, NO_APT_HINT } from "./failure.ts";
import { pinnedPackages, ROOT_PACKAGES } from "./packages.ts";

const run = promisify(execFile);

export interface PackageSet {
  packages: PinnedPackage[];
  /** False when the host's apt could not serve the pinned versions. */
  pinned: boolean;
}

/** Fails early, with the remedy, when the host cannot build images at all. */
export async function checkTools(): Promise<void> {
  for (const tool of ["apt-get", "apt-cache", "dpkg-deb"]) {
    try {
      await run(tool, ["--version"], { timeout: 10_000 });
    } catch {
      throw buildFailed(`${tool} was not found; ${NO_APT_HINT}`);
    }
  }
}

/**
 * The set to build: the pins when the host's apt knows every pinned version,
 * else the closure at the host's candidates. `apt-cache show name=version`
 * prints a stanza per version it has and silently skips the others.
 */
export async function choosePackageSet(warn: (line: string) => void): Promise<PackageSet> {
  const pins = pinnedPackages();
  const { stdout } = await run("apt-cache", ["show", "--no-all-versions", ...pins.map(spec)], { maxBuffer: 64 << 20 }).catch(() => ({ stdout: "" }));
  const known = new Set([...stdout.matchAll(/^Package: (\S+)\n(?:.+\n)*?Version: (\S+)$/gm)].map((m) => `${m[1]}=${m[2]}`));
  const missing = pins.map(spec).filter((pin) => !known.has(pin));
  if (missing.length === 0) return { packages: pins, pinned: true };
  await checkLists();
  warn("agentvm: ************************************************************");
  warn(`agentvm: WARNING: this host's apt lacks ${missing.length} pinned package versions (${missing.slice(0, 3).join(", ")}…).`);
  warn("agentvm: WARNING: building the VM image from this host's candidate versions instead;");
  warn("agentvm: WARNING: the image is NOT the pinned set and may differ from other machines.");
  warn("agentvm: ************************************************************");
  try {
    return { packages: await computeClosure(ROOT_PACKAGES), pinned: false };
  } catch (cause) {
    throw buildFailed(`resolving packages with apt-cache failed: ${(cause as Error).message}; run \`sudo apt-get update\``, cause);
  }
}

/** Without package lists apt knows no package at all; say how to get them. */
async function checkLists(): Promise<void> {
  const { stdout } = await run("apt-cache", ["policy", "coreutils"]).catch(() => ({ stdout: "" }));
  if (!/Candidate: (?!\(none\))/.test(stdout) || !/http|file:|cdrom:/.test(stdout)) {
    throw buildFailed("apt has no package lists (apt-cache knows no downloadable coreutils); run `sudo apt-get update`");
  }
}

function spec(pkg: PinnedPackage): string {
  return `${pkg.name}=${pkg.version}`;
}

/** Downloads every package of the set into dir; returns the .deb paths. */
export async function downloadPackages(set: PackageSet, dir: string): Promise<string[]> {
  try {
    // As root, apt drops to the _apt user, which cannot write a private temp dir; stay root.
    await run("apt-get", ["-q", "-o", "APT::Sandbox::User=root", "download", ...set.packages.map(spec)], { cwd: dir, maxBuffer: 64 << 20 });
  } catch (error) {
    const stderr = String((error as { stderr?: string }).stderr ?? (error as Error).message);
    if (/No space left/.test(stderr)) throw fileSystemFailure("downloading packages", Object.assign(new Error(stderr), { code: "ENOSPC" }));
    if (/Temporary failure resolving|Could not resolve|Could not connect|Failed to fetch|Network is unreachable|Connection failed/.test(stderr)) {
      throw buildFailed(`apt-get could not download packages (no network?): ${firstLine(stderr)}; check the network or apt's proxy settings, then retry`, error);
    }
    if (/Unable to locate package|Can't find a source|not found/.test(stderr)) {
      throw buildFailed(`apt-get does not know the packages: ${firstLine(stderr)}; run \`sudo apt-get update\``, error);
    }
    throw buildFailed(`apt-get download failed: ${firstLine(stderr)}`, error);
  }
  const debs = (await readdir(dir)).filter((name) => name.endsWith(".deb"));
  if (debs.length !== set.packages.length) {
    throw buildFailed(`apt-get downloaded ${debs.length} packages, expected ${set.packages.length}`);
  }
  return debs.sort().map((name) => join(dir, name));
}

function firstLine(text: string): string {
  return (text.split("\n").find((line) => /^E:|^Err/.test(line)) ?? text.split("\n")[0] ?? "").trim();
}
