-- Argo CD health of a wgpin.io PinnedNodeState (gitops/README.md explains the rules).
-- The operator writes the spec; the node's agent writes status.observedGeneration (the
-- generation it applied) and the conditions Ready, FastPathVerified and Degraded
-- (agent/src/cluster.rs, node_status).
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

local function isFalse(c)
  return c ~= nil and c.status == "False"
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
  hs.message = "Waiting for the node's wgpin agent to report status"
  return hs
end

local ready = condition(status, "Ready")
local fastPath = condition(status, "FastPathVerified")
local degraded = condition(status, "Degraded")

-- Degraded before the generation check: an agent that cannot apply a state keeps reporting the
-- generation it applied last, and would otherwise look as if it were still applying.
if isTrue(degraded) or isFalse(fastPath) then
  hs.status = "Degraded"
  if isFalse(ready) then
    hs.message = describe(ready, "Degraded")
  elseif isFalse(fastPath) then
    hs.message = describe(fastPath, "Degraded")
  else
    hs.message = describe(degraded, "Degraded")
  end
  return hs
end

local applied = status.observedGeneration
if generation ~= nil and (applied == nil or applied < generation) then
  hs.status = "Progressing"
  local was = "none yet"
  if applied ~= nil then
    was = "generation " .. applied
  end
  hs.message = "Waiting for the node's agent to apply generation " .. generation ..
    " (applied: " .. was .. ")"
  return hs
end

if isTrue(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end
if isFalse(ready) then
  -- Applying and Pending pass on their own; any other reason comes with Degraded True above,
  -- or is new to this script: say Degraded rather than wait forever.
  if ready.reason == "Applying" or ready.reason == "Pending" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = describe(ready, "Not ready")
  return hs
end
-- Ready Unknown, or not there yet.
hs.status = "Progressing"
if ready == nil then
  hs.message = "Waiting for the node's agent to set Ready"
else
  hs.message = "Ready is " .. (ready.status or "Unknown") .. ": " .. describe(ready, "no reason given")
end
return hs
