-- Argo CD health check for fusion.wrpo.io/FusionRun. Install it under
-- resource.customizations.health.fusion.wrpo.io_FusionRun in argocd-cm (see argocd/argocd-cm-patch.yaml).
-- Succeeded: Healthy; Failed, or a stage Stalled (image pull, crash loop, unschedulable, quota): Degraded;
-- Suspended: Suspended; otherwise (Pending, Running, a stage queued in Kueue): Progressing.
hs = {}
if obj.status == nil or obj.status.observedGeneration == nil
   or (obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or ""
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
  if obj.status.conditions ~= nil then
    for _, condition in ipairs(obj.status.conditions) do
      if condition.type == "Stalled" and condition.status == "True" then
        hs.status = "Degraded"
        message = "stalled: " .. (condition.reason or "") .. ": " .. (condition.message or "")
      end
    end
  end
  if obj.status.stage ~= nil then
    message = "stage " .. obj.status.stage .. " (" .. (obj.status.progress or "?") .. "): " .. message
  end
end
hs.message = message
return hs
