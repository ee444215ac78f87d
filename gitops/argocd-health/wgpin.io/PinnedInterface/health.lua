-- Argo CD health of a wgpin.io PinnedInterface (gitops/README.md explains the rules).
-- The operator writes a kstatus status (Ready, Reconciling, Stalled, NodesSelected,
-- observedGeneration; operator/src/interface_status.rs), read here the way PinnedPeer's is.
-- Before its first pass there is none: an interface the API server accepted is then Healthy,
-- and what goes wrong with it also shows on the PinnedPeers that use it.
-- Argo CD runs this with gopher-lua (Lua 5.1): no goto, integer division or bitwise operators.
local hs = {}

local function condition(status, conditionType)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

-- "Reason: message", or whichever of the two the condition has.
local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  elseif message ~= "" then
    return message
  elseif reason ~= "" then
    return reason
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata.generation
local observed = nil
if status ~= nil then
  observed = status.observedGeneration
end
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the wgpin operator to observe generation " .. generation ..
    " (the status is for generation " .. observed .. ")"
  return hs
end
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Healthy"
  hs.message = "Accepted; wgpin reports problems with an interface on the PinnedPeers that use it"
  return hs
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")
if isTrue(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end
if isTrue(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end
if isTrue(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Reconciling")
  return hs
end
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Not ready")
  return hs
end
-- Ready Unknown, or not there yet.
hs.status = "Progressing"
if ready == nil then
  hs.message = "Waiting for the wgpin operator to set Ready"
else
  hs.message = "Ready is " .. (ready.status or "Unknown") .. ": " .. describe(ready, "no reason given")
end
return hs
