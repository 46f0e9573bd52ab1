# ---- required ------------------------------------------------------------------------------

variable "admin_cidrs" {
  type        = list(string)
  description = "Networks allowed to SSH into the hosts, such as [\"203.0.113.7/32\"] (your address: curl -s https://checkip.amazonaws.com). No default: SSH is never open to the world."

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0))])
    error_message = "admin_cidrs must list at least one network in CIDR form, for example [\"203.0.113.7/32\"]."
  }

  validation {
    condition = alltrue([
      for c in var.admin_cidrs : try(tonumber(split("/", c)[1]) >= (strcontains(c, ":") ? 32 : 8), false)
    ])
    error_message = "admin_cidrs must not open SSH to the world: 0.0.0.0/0, ::/0 and any IPv4 range wider than /8 (IPv6 wider than /32) are refused. Give your own address, for example 203.0.113.7/32."
  }
}

variable "ssh_public_key" {
  type        = string
  description = "OpenSSH public key for the hosts' login user: the content of ~/.ssh/id_ed25519.pub, not its path."

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [^\\n]*)?$", trimspace(var.ssh_public_key)))
    error_message = "ssh_public_key must be one OpenSSH public key line (ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp*), for example the content of ~/.ssh/id_ed25519.pub."
  }
}

# ---- where and what ------------------------------------------------------------------------

variable "region" {
  type        = string
  description = "AWS region; it must offer instance_type in at least two availability zones."
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region code such as us-east-1 or eu-west-1."
  }
}

variable "name" {
  type        = string
  description = "Name of this deployment: prefix of every resource and the Project tag the operations tools search by."
  default     = "llm"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "host_count" {
  type        = number
  description = "Number of GPU hosts. More than one puts an HTTPS load balancer in front, which needs domain_name plus route53_zone_id or certificate_arn."
  default     = 1

  validation {
    condition     = var.host_count >= 1 && var.host_count <= 10 && floor(var.host_count) == var.host_count
    error_message = "host_count must be a whole number from 1 to 10."
  }

  validation {
    condition     = var.host_count == 1 || (var.domain_name != null && (var.route53_zone_id != null || var.certificate_arn != null))
    error_message = "host_count above 1 puts a load balancer in front, whose TLS certificate needs a name: set domain_name and either route53_zone_id (a certificate is requested and validated) or certificate_arn (an existing ACM certificate)."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type of the hosts, an NVIDIA GPU family on x86_64. g5.xlarge: one A10G (24 GB), 4 vCPUs, 16 GiB."
  default     = "g5.xlarge"

  validation {
    condition     = can(regex("^(g4dn|g5|g6|g6e|p4d|p5)\\.([0-9]*xlarge|metal)$", var.instance_type))
    error_message = "instance_type must be an NVIDIA GPU type on x86_64 from the g4dn, g5, g6, g6e, p4d or p5 families, for example g5.xlarge (one A10G) or g5.12xlarge (four)."
  }
}

variable "ami_flavor" {
  type        = string
  description = "Image looked up when ami_id is null: plain Ubuntu LTS (Ansible installs the NVIDIA driver) or the AWS Deep Learning Base OSS Nvidia Driver GPU AMI on Ubuntu (driver preinstalled). Both come from the vendors' public SSM parameters."
  default     = "ubuntu-24.04"

  validation {
    condition     = contains(["ubuntu-24.04", "dlami-ubuntu-24.04"], var.ami_flavor)
    error_message = "ami_flavor must be ubuntu-24.04 or dlami-ubuntu-24.04. Ubuntu 22.04 images are not supported: their Python is 3.10, the gateway needs 3.11 and the vLLM environment is pinned for 24.04's Python 3.12."
  }
}

variable "ami_id" {
  type        = string
  description = "Pin an exact AMI (Ubuntu family, x86_64) instead of the newest image of ami_flavor."
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must be null or an AMI ID such as ami-0123456789abcdef0."
  }
}

variable "root_volume_size_gb" {
  type        = number
  description = "Encrypted gp3 root volume per host, GiB: OS, NVIDIA driver and CUDA, Python environments."
  default     = 100

  validation {
    condition     = var.root_volume_size_gb >= 50 && var.root_volume_size_gb <= 2000
    error_message = "root_volume_size_gb must be between 50 (driver, CUDA and the vLLM environment need about 40) and 2000."
  }
}

variable "models_volume_size_gb" {
  type        = number
  description = "Separate encrypted gp3 volume per host for model weights, GiB; it is kept across stop/start."
  default     = 100

  validation {
    condition     = var.models_volume_size_gb >= 20 && var.models_volume_size_gb <= 16384
    error_message = "models_volume_size_gb must be between 20 and 16384 (the gp3 maximum)."
  }
}

# ---- network and access --------------------------------------------------------------------

variable "vpc_cidr" {
  type        = string
  description = "IPv4 range of the VPC; each of the two availability zones gets a /24 of it."
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 22, false)
    error_message = "vpc_cidr must be an IPv4 CIDR with a prefix between /16 and /22, for example 10.42.0.0/16."
  }
}

variable "api_allowed_cidrs" {
  type        = list(string)
  description = "Networks allowed to call the HTTPS API on 443. Every request needs an API key, so the default is everyone."
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && alltrue([for c in var.api_allowed_cidrs : can(cidrhost(c, 0))])
    error_message = "api_allowed_cidrs must list at least one network in CIDR form, for example [\"0.0.0.0/0\"] or [\"198.51.100.0/24\"]."
  }
}

variable "metrics_ports" {
  type        = map(number)
  description = "Metrics ports on the hosts that only the monitoring security group may reach, by name: the exporters, and nginx's metrics listener (metrics_listener, the Ansible nginx_metrics_port: change both together) through which a Prometheus on another host scrapes the gateway and vLLM."
  default = {
    node_exporter    = 9100
    dcgm_exporter    = 9400
    metrics_listener = 9180
  }

  validation {
    condition = alltrue([
      for p in values(var.metrics_ports) : p >= 1024 && p <= 65535 && floor(p) == p && !(p >= 8000 && p <= 8099)
    ])
    error_message = "metrics_ports must be whole ports from 1024 to 65535, outside 8000-8099 (the gateway on 8080 and vLLM on 8000+ are never exposed)."
  }
}

variable "enable_detailed_monitoring" {
  type        = bool
  description = "One-minute CloudWatch metrics for the GPU hosts (EC2 detailed monitoring, billed per metric): GPU hosts are expensive to watch blind. False: AWS's free five-minute metrics."
  default     = true
}

variable "enable_flow_logs" {
  type        = bool
  description = "Record VPC flow logs in CloudWatch Logs (costs per GB ingested)."
  default     = false
}

# ---- optional: name, load balancer, model cache, shared rate-limit cache ---------------------

variable "domain_name" {
  type        = string
  description = "Name to serve the API under, such as api.example.com, with a trusted certificate: ACM on the load balancer, or Let's Encrypt on a single host (then route53_zone_id and letsencrypt_email are needed too). Without it a single host is reached at its EC2 public DNS name with a self-signed certificate."
  default     = null

  validation {
    condition     = var.domain_name == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.domain_name))
    error_message = "domain_name must be null or a lowercase DNS name such as api.example.com."
  }
}

variable "letsencrypt_email" {
  type        = string
  description = "Contact address of the Let's Encrypt account (expiry notices) for a single host with domain_name: its nginx gets a Let's Encrypt certificate by a DNS-01 challenge in route53_zone_id, with the instance role (port 80 stays closed). Not used with a load balancer (ACM)."
  default     = null

  validation {
    condition     = var.letsencrypt_email == null || can(regex("^[A-Za-z0-9._%+-]+@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)+[A-Za-z]{2,63}$", coalesce(var.letsencrypt_email, "-")))
    error_message = "letsencrypt_email must be null or one e-mail address such as ops@example.com."
  }

  validation {
    condition     = var.host_count > 1 || var.domain_name == null || (var.route53_zone_id != null && var.letsencrypt_email != null)
    error_message = "domain_name on a single host means a Let's Encrypt certificate, obtained by a DNS-01 challenge in Route53 with the host's role: set route53_zone_id (the hosted zone of domain_name) and letsencrypt_email (the account's contact address). Without them, leave domain_name unset: the host is then served at its EC2 name with a self-signed certificate."
  }
}

variable "route53_zone_id" {
  type        = string
  description = "Route53 hosted zone of domain_name: an A record is created (and the load balancer's certificate validated) there. Null: manage DNS yourself."
  default     = null

  validation {
    condition     = var.route53_zone_id == null || (var.domain_name != null && can(regex("^Z[A-Z0-9]{1,31}$", coalesce(var.route53_zone_id, "-"))))
    error_message = "route53_zone_id must be null or a hosted zone ID such as Z0123456789ABCDEFGHIJ, and needs domain_name to be set."
  }
}

variable "certificate_arn" {
  type        = string
  description = "Existing ACM certificate for domain_name, used by the load balancer instead of requesting one."
  default     = null

  validation {
    condition     = var.certificate_arn == null || can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", coalesce(var.certificate_arn, "-")))
    error_message = "certificate_arn must be null or an ACM certificate ARN (arn:aws:acm:REGION:ACCOUNT:certificate/ID)."
  }
}

variable "enable_deletion_protection" {
  type        = bool
  description = "Protect the load balancer from deletion (turn off before `make destroy`)."
  default     = false
}

variable "create_key_store" {
  type        = bool
  description = "Keep the gateways' hashed API keys in one S3 object (own KMS key, versioned) that every host reads, instead of a file on each host; always on with more than one host."
  default     = false
}

variable "create_model_bucket" {
  type        = bool
  description = "Create a private, encrypted, versioned S3 bucket as a model cache, readable by the hosts."
  default     = false
}

variable "enable_shared_cache" {
  type        = bool
  description = "Create the shared rate-limit cache (ElastiCache for Valkey, private, TLS, AUTH token in SSM) even for one host; with host_count above 1 it is always created, so that a key's budget is one budget, not one per host."
  default     = false
}

variable "cache_node_type" {
  type        = string
  description = "ElastiCache node type of the shared cache. It holds small per-key counters: cache.t4g.micro (0.5 GiB) is plenty for thousands of keys."
  default     = "cache.t4g.micro"

  validation {
    condition     = can(regex("^cache\\.[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.cache_node_type))
    error_message = "cache_node_type must be an ElastiCache node type such as cache.t4g.micro or cache.m7g.large."
  }
}

variable "cache_node_count" {
  type        = number
  description = "Nodes of the shared cache: a primary and replicas. More than one turns on Multi-AZ with automatic failover (a replica in the other zone is promoted when the primary fails)."
  default     = 1

  validation {
    condition     = var.cache_node_count >= 1 && var.cache_node_count <= 6 && floor(var.cache_node_count) == var.cache_node_count
    error_message = "cache_node_count must be a whole number from 1 to 6 (a primary and up to five replicas)."
  }
}

variable "tags" {
  type        = map(string)
  description = "Extra tags on every resource (Project and ManagedBy are always set)."
  default     = {}

  validation {
    condition     = !contains(keys(var.tags), "Project") && !contains(keys(var.tags), "Role")
    error_message = "tags must not set Project or Role: the operations tools find the hosts by them."
  }
}

# ---- alerts --------------------------------------------------------------------------------

variable "alert_email" {
  type        = string
  description = "E-mail address subscribed to the alerts topic the hosts' Alertmanager publishes to (AWS sends a confirmation link first); null: subscribe yourself."
  default     = null

  validation {
    condition     = var.alert_email == null || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alert_email))
    error_message = "alert_email must be null or one e-mail address, such as oncall@example.com."
  }
}

variable "alert_topic_kms_key_arn" {
  type        = string
  description = "Customer-managed KMS key ARN for the alerts topic (its key policy must let SNS and the hosts' role use it); null: the AWS-managed SNS key."
  default     = null

  validation {
    condition     = var.alert_topic_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/(mrk-[0-9a-f]{32}|[0-9a-f-]{36})$", var.alert_topic_kms_key_arn))
    error_message = "alert_topic_kms_key_arn must be null or a KMS key ARN (arn:aws:kms:<region>:<account>:key/<key id>)."
  }
}

variable "alert_smtp_port" {
  type        = number
  description = "Let the hosts reach an SMTP relay on this port (587 for Amazon SES), for the monitoring role's `email` receiver; null: the hosts send to TCP 80/443 only, which SNS needs."
  default     = null

  validation {
    condition     = var.alert_smtp_port == null || contains([25, 465, 587, 2465, 2587], coalesce(var.alert_smtp_port, 0))
    error_message = "alert_smtp_port must be null or an SMTP port: 25, 465, 587, 2465 or 2587."
  }
}
