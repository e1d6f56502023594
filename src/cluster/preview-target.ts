/**
 * The pure part of cluster preview forwarding (preview-forwarding.ts): where a
 * token's owning node is reached, decided from what the engine's directory
 * answered. Kept apart so it is tested without an engine.
 *
 * - The directory failing (the engine down, an error status, a bad body) is not
 *   "no such node": the owner may well exist, so the answer is 503
 *   PREVIEW_NODE_UNAVAILABLE (retry), never the 403 an unknown token gets.
 * - A node's advertised preview origin may be https and may leave its port out
 *   (`https://preview.example.com`, behind a TLS-terminating balancer): the
 *   default ports are 443 and 80, and https is spoken over TLS.
 */
import { AgentVmError } from "../errors.ts";

export interface PreviewTarget {
  /** Speak TLS to the owner (its advertised preview origin is https). */
  tls: boolean;
  /** A name or an address, without IPv6 brackets (what net/tls.connect take). */
  host: string;
  port: number;
  /** The origin, for messages. */
  origin: string;
}

export type OwnerLocation = { kind: "found"; target: PreviewTarget } | { kind: "unknown" } | { kind: "unavailable"; error: AgentVmError };

/** Where a node's advertised preview origin is reached; PREVIEW_NODE_UNAVAILABLE when it is not an http(s) origin. */
export function previewTarget(owner: string, previewUrl: string): PreviewTarget {
  let url: URL;
  try {
    url = new URL(previewUrl);
  } catch {
    throw unavailable(owner, `its advertised preview address ${JSON.stringify(previewUrl)} is not a URL`);
  }
  if ((url.protocol !== "http:" && url.protocol !== "https:") || url.hostname === "") {
    throw unavailable(owner, `its advertised preview address ${JSON.stringify(previewUrl)} is not an http(s) origin`);
  }
  const tls = url.protocol === "https:";
  // URL leaves the port empty when it is the scheme's default.
  const port = url.port === "" ? (tls ? 443 : 80) : Number(url.port);
  return { tls, host: url.hostname.replace(/^\[(.*)\]$/, "$1"), port, origin: url.origin };
}

/** The owner's location from a directory lookup: found, unknown (403 upstream), or unavailable (503). */
export async function locateOwner(owner: string, lookup: (owner: string) => Promise<{ previewUrl: string } | undefined>): Promise<OwnerLocation> {
  let addresses: { previewUrl: string } | undefined;
  try {
    addresses = await lookup(owner);
  } catch (error) {
    return { kind: "unavailable", error: unavailable(owner, `the engine's list of nodes could not be read (${(error as Error).message})`, error) };
  }
  if (!addresses) return { kind: "unknown" };
  try {
    return { kind: "found", target: previewTarget(owner, addresses.previewUrl) };
  } catch (error) {
    return { kind: "unavailable", error: AgentVmError.from(error) };
  }
}

function unavailable(owner: string, why: string, cause?: unknown): AgentVmError {
  return new AgentVmError("PREVIEW_NODE_UNAVAILABLE", `this preview belongs to cluster node ${owner}, which cannot be reached now: ${why}; try again shortly`, cause === undefined ? undefined : { cause });
}
