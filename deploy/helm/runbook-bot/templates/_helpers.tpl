{{/*
Names and labels shared by every template.
*/}}

{{- define "runbook-bot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: "<release>-runbook-bot", or the release name alone when it already
contains the chart name. Truncated to 63 characters (DNS label limit).
*/}}
{{- define "runbook-bot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "runbook-bot.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "runbook-bot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "runbook-bot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "runbook-bot.labels" -}}
helm.sh/chart: {{ include "runbook-bot.chart" . }}
{{ include "runbook-bot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "runbook-bot.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Where the bot reads its catalog (RUNBOOK_CATALOG), by catalog.source:
  image      the catalog baked into the image
  configMap  the ConfigMap's files, mounted flat
  gitSync    the synced checkout; git-sync swaps the "current" link atomically
*/}}
{{- define "runbook-bot.catalogPath" -}}
{{- if eq .Values.catalog.source "configMap" -}}
/catalog
{{- else if eq .Values.catalog.source "gitSync" -}}
{{- printf "/git/current/%s" (.Values.catalog.gitSync.path | trimPrefix "/") | trimSuffix "/" }}
{{- else -}}
/app/runbooks
{{- end }}
{{- end }}

{{- define "runbook-bot.catalogConfigMapName" -}}
{{- .Values.catalog.configMap.name | default (printf "%s-catalog" (include "runbook-bot.fullname" .)) }}
{{- end }}

{{/*
The bot's service account: serviceAccount.name, else the chart's name when the chart
creates it, else the namespace's "default".
*/}}
{{- define "runbook-bot.serviceAccountName" -}}
{{- if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.create -}}
{{- include "runbook-bot.fullname" . }}
{{- else -}}
default
{{- end }}
{{- end }}

{{/*
"true" when the bot keeps its state in PostgreSQL (database.existingSecret names the Secret
holding the URL), "" for SQLite on the chart's volume.
*/}}
{{- define "runbook-bot.postgres" -}}
{{- if .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/*
The number of pods: replicaCount, else 2 on PostgreSQL and 1 on SQLite. Validated in
runbook-bot.validate.
*/}}
{{- define "runbook-bot.replicas" -}}
{{- $count := .Values.replicaCount }}
{{- if or (kindIs "invalid" $count) (eq (toString $count) "") }}
{{- ternary 2 1 (eq (include "runbook-bot.postgres" .) "true") }}
{{- else }}
{{- $count }}
{{- end }}
{{- end }}

{{- define "runbook-bot.pvcName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "runbook-bot.fullname" .)) }}
{{- end }}

{{/*
Refuse values that would deploy a bot that cannot start or cannot find its catalog.
*/}}
{{- define "runbook-bot.validate" -}}
{{- $sources := list "image" "configMap" "gitSync" }}
{{- if not (has .Values.catalog.source $sources) }}
{{- fail (printf "catalog.source must be one of image, configMap, gitSync (got %q)" .Values.catalog.source) }}
{{- end }}
{{- if and (eq .Values.catalog.source "gitSync") (not .Values.catalog.gitSync.repo) }}
{{- fail "catalog.source=gitSync needs catalog.gitSync.repo (the catalog's Git URL)" }}
{{- end }}
{{- if and (eq .Values.catalog.source "configMap") (not .Values.catalog.configMap.name) (not .Values.catalog.configMap.files) }}
{{- fail "catalog.source=configMap needs catalog.configMap.name (an existing ConfigMap) or catalog.configMap.files" }}
{{- end }}
{{- if and (eq .Values.catalog.source "gitSync") .Values.catalog.commit }}
{{- fail "catalog.commit is for image and configMap catalogs: with gitSync the bot reads each synced commit from the checkout, and a fixed value would go stale" }}
{{- end }}
{{- if lt (float64 .Values.catalog.refreshSeconds) 0.0 }}
{{- fail "catalog.refreshSeconds must be 0 (no periodic checks) or more" }}
{{- end }}
{{- if not (has .Values.logFormat (list "text" "json")) }}
{{- fail (printf "logFormat must be text or json (got %q)" .Values.logFormat) }}
{{- end }}
{{- if .Values.kubernetes.namespaces }}
{{- if not (or .Values.serviceAccount.name .Values.serviceAccount.create) }}
{{- fail "kubernetes.namespaces gives the bot rights to run Jobs: give it its own service account (serviceAccount.create=true or serviceAccount.name), not the namespace's default" }}
{{- end }}
{{- if not .Values.serviceAccount.automountToken }}
{{- fail "kubernetes.namespaces needs serviceAccount.automountToken=true: the bot calls the Kubernetes API with its service account's token" }}
{{- end }}
{{- end }}
{{- range .Values.kubernetes.serviceAccounts }}
{{- if not (and .name .namespace) }}
{{- fail "each kubernetes.serviceAccounts entry needs a name and a namespace" }}
{{- end }}
{{- end }}
{{- if hasKey .Values.database "url" }}
{{- fail "database.url: the database URL may carry a password, so it is never a value; put it in a Secret (kubectl create secret generic runbook-bot-db --from-literal=url='postgresql://...') and set database.existingSecret=runbook-bot-db" }}
{{- end }}
{{- if and .Values.database.existingSecret (not .Values.database.secretKey) }}
{{- fail "database.secretKey must name the key of database.existingSecret that holds the postgresql:// URL" }}
{{- end }}
{{- if and .Values.signingKey.existingSecret (not .Values.signingKey.secretKey) }}
{{- fail "signingKey.secretKey must name the key of signingKey.existingSecret that holds the PEM private key" }}
{{- end }}
{{- $replicas := include "runbook-bot.replicas" . }}
{{- if not (regexMatch "^[0-9]+$" $replicas) }}
{{- fail (printf "replicaCount must be a whole number (got %q)" $replicas) }}
{{- end }}
{{- if include "runbook-bot.postgres" . }}
{{- if lt (atoi $replicas) 1 }}
{{- fail (printf "replicaCount=%s: run at least 1 replica (leave it empty for 2)" $replicas) }}
{{- end }}
{{- else if ne $replicas "1" }}
{{- fail (printf "replicaCount=%s: SQLite is one replica (one database file on a ReadWriteOnce volume, and a second bot on it refuses to start). Leave replicaCount empty, or set database.existingSecret to run several replicas on PostgreSQL (deploy/README.md, \"Several replicas on PostgreSQL\")" $replicas) }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- fail "secrets.existingSecret must name the Secret holding the Slack and PagerDuty credentials (see deploy/README.md)" }}
{{- end }}
{{- end }}

{{/*
The git-sync container, as the one-time init container or the long-running sidecar.
Called with (dict "ctx" $ "oneTime" bool). It runs as git-sync's own user (65533); the pod's
fsGroup lets the bot read what it writes.
*/}}
{{- define "runbook-bot.gitSyncContainer" -}}
{{- $gs := .ctx.Values.catalog.gitSync -}}
image: {{ printf "%s:%s" $gs.image.repository $gs.image.tag | quote }}
imagePullPolicy: {{ $gs.image.pullPolicy }}
args:
  - --repo={{ $gs.repo }}
  - --ref={{ $gs.ref }}
  - --root=/git
  - --link=current
  - --depth=1
  {{- if .oneTime }}
  - --one-time
  {{- else }}
  - --period={{ $gs.period }}
  {{- end }}
  {{- if $gs.sshKeySecret }}
  - --ssh-key-file=/etc/git-secret/ssh
  - --ssh-known-hosts-file=/etc/git-secret/known_hosts
  {{- end }}
env:
  - name: HOME
    value: /tmp
{{- with $gs.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
resources:
  {{- toYaml $gs.resources | nindent 2 }}
securityContext:
  {{- toYaml (merge (dict "runAsUser" 65533) .ctx.Values.securityContext) | nindent 2 }}
volumeMounts:
  - name: catalog
    mountPath: /git
  - name: git-tmp
    mountPath: /tmp
  {{- if $gs.sshKeySecret }}
  - name: git-secret
    mountPath: /etc/git-secret
    readOnly: true
  {{- end }}
{{- end }}
