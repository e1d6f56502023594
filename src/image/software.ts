/**
 * The software catalog: what a VM definition's `software: [...]` may name, and
 * how each entry becomes a read-only layer on top of the base image.
 *
 * `common` is the base image itself (shell, coreutils, git, curl, node, npm), so
 * it adds no layer. `pi` is an npm package installed once per machine with the
 * image's own node and npm, mounted at /opt/software/pi.
 */
import { invalidArgument } from "../errors.ts";

export interface SoftwareDescriptor {
  readonly kind: "agentvm-software";
  readonly name: SoftwareName;
}

/** What `software` entries may be: our descriptors, the seeds' packages, or a catalog name. */
export type SoftwareEntry = SoftwareDescriptor | string | object;

export interface NpmSoftware {
  package: string;
  /** Exact version: a layer is built once per machine and must not drift. */
  version: string;
}

interface CatalogEntry {
  /** npm packages users may pass instead of our descriptor (agentOS's software packages). */
  aliases: readonly string[];
  /** Installed as a layer; absent when the base image already has it. */
  npm?: NpmSoftware;
}

const CATALOG = {
  common: { aliases: ["@rivet-dev/agent-os-common"] },
  pi: { aliases: ["@rivet-dev/agent-os-pi"], npm: { package: "@mariozechner/pi-coding-agent", version: "0.73.1" } },
} as const satisfies Record<string, CatalogEntry>;

export type SoftwareName = keyof typeof CATALOG;

export const SOFTWARE_NAMES = Object.freeze(Object.keys(CATALOG) as SoftwareName[]);

function descriptor(name: SoftwareName): SoftwareDescriptor {
  return Object.freeze({ kind: "agentvm-software", name });
}

export const common: SoftwareDescriptor = descriptor("common");
export const pi: SoftwareDescriptor = descriptor("pi");

const BY_NAME = new Map<string, SoftwareDescriptor>([
  ["common", common],
  ["pi", pi],
]);
for (const [name, entry] of Object.entries(CATALOG)) {
  for (const alias of entry.aliases) BY_NAME.set(alias, BY_NAME.get(name)!);
}

/** The npm package a software entry installs, if it is a layer. */
export function npmSoftware(software: SoftwareDescriptor): NpmSoftware | undefined {
  return (CATALOG[software.name] as CatalogEntry).npm;
}

/** Where a software layer mounts in the VM. */
export function layerMountPoint(name: SoftwareName): string {
  return `/opt/software/${name}`;
}

/** Mount points of every layer the catalog can add; the base image carries them empty. */
export const LAYER_MOUNT_POINTS: readonly string[] = Object.freeze(
  SOFTWARE_NAMES.filter((name) => (CATALOG[name] as CatalogEntry).npm).map(layerMountPoint),
);

/** Fields under which a package object may carry its npm name. */
const NAME_FIELDS = ["packageName", "package", "name", "id"] as const;

/** An unknown entry as a user would recognise it: by the name it carries, if any. */
function describeEntry(entry: unknown): string {
  if (entry && typeof entry === "object") {
    for (const field of NAME_FIELDS) {
      const named = (entry as Record<string, unknown>)[field];
      if (typeof named === "string") return `${describe(entry)} (${field} ${JSON.stringify(named.slice(0, 100))})`;
    }
  }
  return describe(entry);
}

/** Finds the catalog entry an unknown value names, or undefined. */
function identify(value: unknown, depth = 0): SoftwareDescriptor | undefined {
  if (typeof value === "string") return BY_NAME.get(value);
  if (!value || (typeof value !== "object" && typeof value !== "function") || depth > 2) return undefined;
  const record = value as Record<string, unknown>;
  if (record.kind === "agentvm-software") return typeof record.name === "string" ? BY_NAME.get(record.name) : undefined;
  for (const field of NAME_FIELDS) {
    const named = record[field];
    if (typeof named === "string" && BY_NAME.has(named)) return BY_NAME.get(named);
    // `{ package: { name: "@rivet-dev/agent-os-pi" } }` or a package.json under another key.
    if (named && typeof named === "object") {
      const inner = identify(named, depth + 1);
      if (inner) return inner;
    }
  }
  for (const nested of ["packageJson", "default"]) {
    if (record[nested] && record[nested] !== value) {
      const inner = identify(record[nested], depth + 1);
      if (inner) return inner;
    }
  }
  return undefined;
}

function describe(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (value && typeof value === "object") {
    const keys = Object.keys(value).slice(0, 5);
    return `an object with keys [${keys.join(", ")}]`;
  }
  return String(value);
}

/**
 * Validates a VM definition's `software` list and returns our descriptors,
 * without duplicates. `field` names the option in error messages.
 */
export function parseSoftware(value: unknown, field = "software"): SoftwareDescriptor[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw invalidArgument(`${field} must be an array of software entries such as [common, pi] from "agentvm/software", got ${describe(value)}`);
  const found: SoftwareDescriptor[] = [];
  value.forEach((entry, index) => {
    const software = identify(entry);
    if (!software) {
      throw invalidArgument(
        `${field}[${index}] is not known software: ${describeEntry(entry)}. Available: ${SOFTWARE_NAMES.map((name) => `${name} (import { ${name} } from "agentvm/software", or ${CATALOG[name].aliases.join(", ")})`).join("; ")}. ` +
          "Anything else can be installed inside the VM with npm or added to the catalog in src/image/software.ts",
      );
    }
    if (!found.includes(software)) found.push(software);
  });
  return found;
}
