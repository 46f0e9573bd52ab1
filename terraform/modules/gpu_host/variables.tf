variable "name" {
  type        = string
  description = "Prefix for resource names; hosts are named <name>-gpu-<index>."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "host_count" {
  type        = number
  description = "Number of GPU hosts."
  default     = 1

  validation {
    condition     = var.host_count >= 1 && var.host_count <= 10 && floor(var.host_count) == var.host_count
    error_message = "host_count must be a whole number from 1 to 10."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type; must be an NVIDIA GPU family on x86_64. g5.xlarge is one A10G (24 GB), 4 vCPUs, 16 GiB."
  default     = "g5.xlarge"

  validation {
    condition     = can(regex("^(g4dn|g5|g6|g6e|p4d|p5)\\.([0-9]*xlarge|metal)$", var.instance_type))
    error_message = "instance_type must be an NVIDIA GPU type on x86_64 from the g4dn, g5, g6, g6e, p4d or p5 families, for example g5.xlarge (one A10G) or g5.12xlarge (four)."
  }
}

variable "ami_flavor" {
  type        = string
  description = "Operating system image looked up when ami_id is not set: plain Ubuntu LTS (Ansible installs the NVIDIA driver) or the AWS Deep Learning Base OSS Nvidia Driver GPU AMI on Ubuntu (driver preinstalled). Both come from the vendors' public SSM parameters."
  default     = "ubuntu-24.04"

  validation {
    condition     = contains(["ubuntu-24.04", "dlami-ubuntu-24.04"], var.ami_flavor)
    error_message = "ami_flavor must be ubuntu-24.04 or dlami-ubuntu-24.04. Ubuntu 22.04 images are not supported: their Python is 3.10, the gateway needs 3.11 and the vLLM environment is pinned for 24.04's Python 3.12."
  }
}

variable "ami_id" {
  type        = string
  description = "A fixed AMI ID instead of the newest image of ami_flavor (pins the OS image exactly). Must be an Ubuntu-family x86_64 image."
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must be null or an AMI ID such as ami-0123456789abcdef0."
  }
}

variable "ssh_user" {
  type        = string
  description = "Login user of the image (ubuntu for every ami_flavor)."
  default     = "ubuntu"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.ssh_user))
    error_message = "ssh_user must be a Linux user name: lowercase letters, digits, _ and -, at most 32 characters."
  }
}

variable "ssh_public_key" {
  type        = string
  description = "OpenSSH public key installed for ssh_user (the content of ~/.ssh/id_ed25519.pub, not a path)."

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [^\\n]*)?$", trimspace(var.ssh_public_key)))
    error_message = "ssh_public_key must be one OpenSSH public key line (ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp*), for example the content of ~/.ssh/id_ed25519.pub."
  }
}

variable "subnets" {
  type = list(object({
    id                = string
    availability_zone = string
  }))
  description = "Subnets the hosts are spread over, round-robin, with their availability zones (the models volumes are created there)."

  validation {
    condition     = length(var.subnets) >= 1
    error_message = "subnets must list at least one subnet."
  }
}

variable "security_group_ids" {
  type        = list(string)
  description = "Security groups attached to every host."

  validation {
    condition     = length(var.security_group_ids) >= 1
    error_message = "security_group_ids must list at least one security group."
  }
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of the encrypted gp3 root volume in GiB (OS, NVIDIA driver and CUDA, Python environments)."
  default     = 100

  validation {
    condition     = var.root_volume_size_gb >= 50 && var.root_volume_size_gb <= 2000
    error_message = "root_volume_size_gb must be between 50 (driver, CUDA and the vLLM environment need about 40) and 2000."
  }
}

variable "models_volume_size_gb" {
  type        = number
  description = "Size of the separate encrypted gp3 volume holding model weights, in GiB. It survives stop/start and a replacement of the instance."
  default     = 100

  validation {
    condition     = var.models_volume_size_gb >= 20 && var.models_volume_size_gb <= 16384
    error_message = "models_volume_size_gb must be between 20 and 16384 (the gp3 maximum)."
  }
}

variable "enable_model_bucket_access" {
  type        = bool
  description = "Grant the hosts read access to model_bucket_arn, and write access under model_bucket_write_prefix (the shared weights cache)."
  default     = false
}

variable "model_bucket_arn" {
  type        = string
  description = "ARN of the S3 model-cache bucket the hosts use; used when enable_model_bucket_access is true."
  default     = null

  validation {
    condition     = !var.enable_model_bucket_access || var.model_bucket_arn != null
    error_message = "model_bucket_arn must be set when enable_model_bucket_access is true."
  }
}

variable "model_bucket_write_prefix" {
  type        = string
  description = "Key prefix (no leading or trailing slash) under which the hosts may upload to the model bucket: the models role's S3 cache lives there (models_s3_cache = s3://<bucket>/<prefix>)."
  default     = "hf-cache"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$", var.model_bucket_write_prefix))
    error_message = "model_bucket_write_prefix must be lowercase path segments separated by single slashes, without a leading or trailing slash, e.g. hf-cache."
  }
}

variable "letsencrypt_domain" {
  type        = string
  description = "Name a single host gets a Let's Encrypt certificate for, by a DNS-01 challenge in letsencrypt_zone_id (certbot's Route53 plugin, with the instance role); null: no Route53 permissions."
  default     = null

  validation {
    condition     = var.letsencrypt_domain == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", coalesce(var.letsencrypt_domain, "-")))
    error_message = "letsencrypt_domain must be null or a lowercase DNS name such as api.example.com."
  }
}

variable "letsencrypt_zone_id" {
  type        = string
  description = "Route53 hosted zone of letsencrypt_domain: the only zone in which the instance role may write, and there only the TXT record _acme-challenge.<letsencrypt_domain>."
  default     = null

  validation {
    condition     = (var.letsencrypt_zone_id == null) == (var.letsencrypt_domain == null) && (var.letsencrypt_zone_id == null || can(regex("^Z[A-Z0-9]{1,31}$", coalesce(var.letsencrypt_zone_id, "-"))))
    error_message = "letsencrypt_zone_id must be a Route53 hosted zone ID such as Z0123456789ABCDEFGHIJ when letsencrypt_domain is set, and null when it is not."
  }
}

variable "detailed_monitoring" {
  type        = bool
  description = "One-minute CloudWatch metrics for the hosts (EC2 detailed monitoring)."
  default     = true
}
