export { agentOS, agentOs, isVmDefinition } from "./definition.ts";
export type { AgentOsConfig, PreviewConfig, SoftwarePackage, VmDefinition } from "./definition.ts";
export { setup, Registry } from "./registry.ts";
export type { StartOptions, RunningServer } from "./registry.ts";
export type { DestroyResult, VmSummary } from "./vm-actor.ts";
export { generateApiKey, hashApiKey, TOKEN_ACTIONS } from "./auth.ts";
export type { AuthOptions, MintedToken, TokenAction, TokenRequest } from "./auth.ts";
