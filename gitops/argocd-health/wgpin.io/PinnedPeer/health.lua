-- Argo CD health of a wgpin.io PinnedPeer (gitops/README.md explains the rules).
-- The operator writes status.observedGeneration and kstatus conditions: Ready, Reconciling,
-- Stalled, plus Enforced and SourceViolation (operator/src/rollup.rs).
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
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the wgpin operator to report the peer's status"
  return hs
end

-- Conditions written for an older spec say nothing about this one.
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the wgpin operator to observe generation " .. generation ..
    " (the status is for generation " .. observed .. ")"
  return hs
end

-- A violation is the pin at work (the packets were refused): it never degrades the peer, but
-- every message says so.
local violation = condition(status, "SourceViolation")
local function withViolation(message)
  if isTrue(violation) then
    local seen = violation.message
    if seen == nil or seen == "" then
      seen = "packets from outside the pin"
    end
    return message .. "; SourceViolation (refused by the pin): " .. seen
  end
  return message
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")

-- Stalled before Reconciling: a node that cannot enforce the pin is a failure even while
-- another node is still applying it.
if isTrue(stalled) then
  hs.status = "Degraded"
  hs.message = withViolation(describe(stalled, "Stalled"))
  return hs
end
if isTrue(ready) then
  hs.status = "Healthy"
  hs.message = withViolation(describe(ready, "Ready"))
  return hs
end
if isTrue(reconciling) then
  hs.status = "Progressing"
  hs.message = withViolation(describe(reconciling, "Reconciling"))
  return hs
end
if ready ~= nil and ready.status == "False" then
  -- Pending: some node has not reported this generation yet. Any other reason needs a change.
  if ready.reason == "Pending" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = withViolation(describe(ready, "Not ready"))
  return hs
end
-- Ready Unknown, or not there yet.
hs.status = "Progressing"
if ready == nil then
  hs.message = withViolation("Waiting for the wgpin operator to set Ready")
else
  hs.message = withViolation("Ready is " .. (ready.status or "Unknown") .. ": " .. describe(ready, "no reason given"))
end
return hs
